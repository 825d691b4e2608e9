"""Cross-attention probabilities of chosen token positions, read through diffusers' attention processors.

:func:`probing` installs :class:`AttentionProbe` on every cross-attention (``attn2``) of a UNet for a
block and puts the previous processors back in ``finally``. The probe is diffusers' ``AttnProcessor``
(explicit softmax, so the probabilities exist and carry gradients) and hands ``probs``
(batch*heads x pixels x 77) to a sink. MACE trains on them (its attention loss) and derives masks
from them; FMN minimises the concept tokens' share of them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from ..errors import ConfigError


class AttentionProbe:
    """diffusers' own ``AttnProcessor`` that also hands the probabilities it computes to ``sink(probs, heads)``.

    The attention is diffusers' (its explicit-softmax processor, so the probabilities exist and carry
    gradients); the probe wraps the block's ``get_attention_scores`` for the one call and removes the
    wrapper in ``finally``.
    """

    def __init__(self, sink: Callable[[torch.Tensor, int], None]):
        from diffusers.models.attention_processor import AttnProcessor

        self.inner, self.sink = AttnProcessor(), sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        scores = attn.get_attention_scores

        def reporting(query, key, mask=None):
            probs = scores(query, key, mask)
            self.sink(probs, attn.heads)
            return probs

        attn.get_attention_scores = reporting   # this call only
        try:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        finally:
            del attn.get_attention_scores


@contextmanager
def probing(unet, sink: Callable[[torch.Tensor, int], None]):
    """Every cross-attention of ``unet`` reports to ``sink`` inside the block; processors restored after.
    On an SD 3 / Flux transformer, every joint attention reports its image-to-text probabilities
    (:mod:`erasekit.erase.joint_attention`)."""
    if hasattr(unet, "context_embedder"):   # an MMDiT transformer: B x heads x N x T, reported as B*heads x N x T
        from .joint_attention import probing_joint

        family = "flux" if hasattr(unet, "single_transformer_blocks") else "sd3"
        with probing_joint(unet, family, lambda p: sink(p.flatten(0, 1), p.shape[1])):
            yield
        return
    before = dict(unet.attn_processors)
    probe = AttentionProbe(sink)
    unet.set_attn_processor({name: probe if name.endswith("attn2.processor") else proc
                             for name, proc in before.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(before)


def pixel_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """``mask`` (B x H x W, latent resolution) resized (nearest) to a layer with ``pixels`` positions,
    flattened to B x pixels (bool)."""
    b, h, w = mask.shape
    f = (h * w / pixels) ** 0.5
    size = (max(1, round(h / f)), max(1, round(w / f)))
    small = torch.nn.functional.interpolate(mask[:, None].float(), size=size, mode="nearest")
    return small.flatten(1) > 0.5


def concept_positions(adapter, prompts: list[str], words: list[str], use_pooler: bool,
                      fix: str = "give `concept_words` that the prompts contain, or prompts that contain them"
                      ) -> torch.Tensor:
    """``B x rows`` bool (77 on a UNet; an MMDiT's text rows, each tokenizer's segment with its own tokens):
    where any of ``words``' token sequences occurs in each prompt, and with ``use_pooler`` every position
    that holds the end token (the reference's rule: on SD 1.x tokenizers, which pad with the end token,
    that is the end token and the padding after it; SD 2.x pads with "!" and T5 with ``<pad>``, so there
    it is the end token alone). A prompt without any of ``words`` is a ConfigError ending in ``fix``."""
    found, ends = zip(*[_segment_positions(adapter, seg.which, prompts, words) for seg in adapter.segments])
    found, ends = torch.cat(found, dim=1), torch.cat(ends, dim=1)
    if found.shape[1] != sum(seg.length for seg in adapter.segments):
        raise ConfigError(f"token positions ({found.shape[1]}) do not line up with the text rows {adapter.segments}")
    for i in torch.nonzero(~found.any(1)).flatten().tolist():
        raise ConfigError(f"none of the concept words {words} occurs in the prompt {prompts[i]!r}: {fix}")
    return found | ends if use_pooler else found


def _segment_positions(adapter, which: int, prompts: list[str], words: list[str]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions of ``words``, positions of the end token) in ``prompts`` under tokenizer ``which``."""
    tokenizer = adapter.tokenizers[which]
    tokens = adapter.tokenize(prompts, which)
    ids = tokens.input_ids.cpu()
    seqs = [tokenizer(w, add_special_tokens=False).input_ids for w in words]
    found = torch.zeros(ids.shape, dtype=torch.bool)
    for i, row in enumerate(ids.tolist()):
        for seq in seqs:
            for j in range(len(row) - len(seq) + 1):
                if seq and row[j:j + len(seq)] == seq:
                    found[i, j:j + len(seq)] = True
    return found, ids == tokenizer.eos_token_id

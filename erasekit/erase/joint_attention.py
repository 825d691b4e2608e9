"""Image-to-text attention probabilities of an MMDiT's joint attention (SD 3 / 3.5, Flux).

A UNet's cross-attention has its own softmax over the 77 text keys. An MMDiT has one *joint* softmax
per block over the text keys and the image keys together; the image-to-text attention is that
softmax's text columns for the image queries:

    A = softmax(q_img [k_txt; k_img]^T / sqrt(d))[:, :T]        (N_img x T per head)

so its rows sum to less than one (the rest goes to image keys). :class:`JointProbe` computes ``A``
from the block's own projections and norms, as the block's processor computes them (Flux: rotary
position embedding on both), and hands it to ``sink(probs, heads)`` in the UNet probe's layout
(batch*heads x image tokens x text rows), then runs the block's own processor for the output, which
it leaves unchanged. Flux's single-stream blocks read one sequence ``[text; image]`` through shared
projections; there the text keys are the first ``T`` rows of that sequence.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch


def _heads(x: torch.Tensor, heads: int, norm) -> torch.Tensor:
    """``B x S x (heads*d)`` -> ``B x S x heads x d``, normalised as the processor normalises it."""
    x = x.unflatten(-1, (heads, -1))
    return norm(x) if norm is not None else x


class JointProbe:
    """Wraps a joint-attention processor: reports the image-to-text probabilities, then runs the processor."""

    def __init__(self, inner, sink: Callable[[torch.Tensor, int], None], state: dict):
        self.inner, self.sink, self.state = inner, sink, state

    def joint(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb) -> tuple[torch.Tensor, int]:
        """(the joint softmax of the image queries over the keys ``[text; image]``, B x heads x N_img x (T + N_img),
        and ``T``)."""
        heads = attn.heads
        q = _heads(attn.to_q(hidden_states), heads, attn.norm_q)
        k = _heads(attn.to_k(hidden_states), heads, attn.norm_k)
        if encoder_hidden_states is not None:      # a dual-stream block: text keys from add_k_proj
            k_txt = _heads(attn.add_k_proj(encoder_hidden_states), heads, getattr(attn, "norm_added_k", None))
            text, k, image_queries = k_txt.shape[1], torch.cat([k_txt, k], dim=1), slice(None)
        else:                                      # Flux single-stream: one sequence [text; image]
            text = self.state["text"]
            image_queries = slice(text, None)
        if image_rotary_emb is not None:           # Flux: rotary embedding over [text; image] positions
            from diffusers.models.embeddings import apply_rotary_emb

            cos, sin = image_rotary_emb
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
            rot = image_rotary_emb if encoder_hidden_states is None else (cos[text:], sin[text:])
            q = apply_rotary_emb(q, rot, sequence_dim=1)
        q = q[:, image_queries]
        scores = torch.einsum("bnhd,bshd->bhns", q, k) * q.shape[-1] ** -0.5
        return scores.softmax(-1), text

    def probs(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb) -> torch.Tensor:
        """The image-to-text probabilities, B*heads x N_img x T (the joint softmax's text columns)."""
        joint, text = self.joint(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        return joint[..., :text].flatten(0, 1)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        self.sink(self.probs(attn, hidden_states, encoder_hidden_states, image_rotary_emb), attn.heads)
        extra = {} if image_rotary_emb is None else {"image_rotary_emb": image_rotary_emb}
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)


@contextmanager
def joint_probing(transformer, sink: Callable[[torch.Tensor, int], None]):
    """Every attention of an SD 3 / Flux ``transformer`` reports its image-to-text probabilities to ``sink``
    inside the block; the processors are put back in ``finally``."""
    before = dict(transformer.attn_processors)
    state: dict = {}

    def text_length(module, args, kwargs):
        state["text"] = kwargs["encoder_hidden_states"].shape[1]

    handle = transformer.register_forward_pre_hook(text_length, with_kwargs=True)
    transformer.set_attn_processor({name: JointProbe(proc, sink, state) for name, proc in before.items()})
    try:
        yield
    finally:
        handle.remove()
        transformer.set_attn_processor(before)

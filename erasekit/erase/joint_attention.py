"""The attention that image tokens pay to chosen text tokens inside an MMDiT's joint attention (SD 3, Flux).

An MMDiT has no cross-attention: each joint block runs one softmax over the concatenated keys of the image
and the text tokens, ``softmax(q_img [k_img ; k_txt]^T / sqrt(d))``, and the text tokens' columns of that
softmax are how much each image query reads each text token, the counterpart of a UNet's cross-attention map.
diffusers' processors (``JointAttnProcessor2_0``, ``FluxAttnProcessor``) compute the attention with a fused
kernel, so the probabilities never exist. :func:`probing_joint` puts :class:`JointAttentionProbe` on every
attention of the transformer for a block: it recomputes the block's queries and keys exactly as the processor
does (the same projections, the per-head RMS norms, Flux's rotary embedding), forms the image queries' softmax
over all keys, hands its text columns (batch x heads x image tokens x text rows) to a sink, and then runs the
block's own processor, so the block's output is diffusers' unchanged. The queries and keys are projected twice
per call, and the image-to-image scores are materialised (batch x heads x N x (N + text rows)), which the exact
joint softmax needs for its normaliser.

Flux's single-stream blocks run the same joint softmax over ``[text ; image]`` tokens with shared projections;
their text columns are probed too (the concept's tokens are read there as well).

Used by FMN (its attention-resteering loss) and MACE (its LoRA stage's attention loss), through
:func:`erasekit.erase.attention_maps.probing` for MACE; the concept's rows of the text conditioning come from
:func:`erasekit.erase.attention_maps.concept_positions`, segment by segment.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from ..errors import ConfigError


def _sd3_qk(attn, hidden_states, encoder_hidden_states):
    """(image queries B x H x N x d, keys B x H x (N + T) x d, text columns slice) as JointAttnProcessor2_0."""
    b = hidden_states.shape[0]

    def heads(x):
        return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    q, k, k_txt = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), \
        heads(attn.add_k_proj(encoder_hidden_states))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if attn.norm_added_k is not None:
        k_txt = attn.norm_added_k(k_txt)
    n = q.shape[2]
    return q, torch.cat([k, k_txt], dim=2), slice(n, None)


def _flux_qk(attn, hidden_states, encoder_hidden_states, image_rotary_emb, text_len: int):
    """The same for ``FluxAttnProcessor``: text first in the sequence, rotary embedding on queries and keys.
    Only the projections the image queries' scores need run (``to_q``, ``to_k``, ``add_k_proj``)."""
    from diffusers.models.embeddings import apply_rotary_emb

    def heads(x):
        return x.unflatten(-1, (-1, attn.head_dim))

    joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
    if getattr(attn, "fused_projections", False):
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        q, k, _, _, ek, _ = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    else:
        q, k = attn.to_q(hidden_states), attn.to_k(hidden_states)
        ek = attn.add_k_proj(encoder_hidden_states) if joint else None
    q, k = attn.norm_q(heads(q)), attn.norm_k(heads(k))
    if joint:   # a joint block: the text stream's own keys come first
        k = torch.cat([attn.norm_added_k(heads(ek)), k], dim=1)
    else:       # a single-stream block: one [text ; image] sequence
        q = q[:, text_len:]
    if image_rotary_emb is not None:
        cos, sin = image_rotary_emb
        q = apply_rotary_emb(q, (cos[text_len:], sin[text_len:]), sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
    return q.transpose(1, 2), k.transpose(1, 2), slice(0, text_len)


class JointAttentionProbe:
    """Wraps one attention's processor: reports the image queries' joint-softmax probabilities over the text rows
    to ``sink(probs)`` (B x heads x N x T), then returns the wrapped processor's output (module docstring)."""

    def __init__(self, inner, family: str, sink: Callable[[torch.Tensor], None], text_len: int | dict):
        self.inner, self.family, self.sink, self.text_len = inner, family, sink, text_len

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if self.family == "flux":
            text_len = self.text_len["rows"] if isinstance(self.text_len, dict) else self.text_len
            q, k, cols = _flux_qk(attn, hidden_states, encoder_hidden_states, image_rotary_emb, text_len)
        else:
            q, k, cols = _sd3_qk(attn, hidden_states, encoder_hidden_states)
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5   # the kernel's default scale
        self.sink(scores.softmax(dim=-1)[..., cols])
        if self.family == "flux":
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)


@contextmanager
def probing_joint(transformer, family: str, sink: Callable[[torch.Tensor], None], text_len: int | None = None):
    """Every attention of an SD 3 / Flux ``transformer`` reports to ``sink`` in the block; processors restored.
    ``text_len``: the rows of the text conditioning (Flux's single-stream blocks see text and image as one
    sequence); None: read from each transformer call's ``encoder_hidden_states``."""
    before = dict(transformer.attn_processors)
    if not before:
        raise ConfigError(f"{type(transformer).__name__} has no attention processors to probe")
    handle = None
    if text_len is None:
        text_len = {}

        def read_rows(module, args, kwargs):
            text_len["rows"] = kwargs["encoder_hidden_states"].shape[1]

        handle = transformer.register_forward_pre_hook(read_rows, with_kwargs=True)
    transformer.set_attn_processor({name: JointAttentionProbe(proc, family, sink, text_len)
                                    for name, proc in before.items()})
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        transformer.set_attn_processor(before)


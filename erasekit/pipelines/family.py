"""Telling SD 1.x, SD 2.x, SDXL, SD 3 and Flux apart, and the per-family text side: tokens, positions, encodings.

One :class:`FamilyAdapter` per pipeline answers the questions every method asks:
which tokens a prompt has and where its last word and EOS sit, how a prompt becomes the context
the UNet's cross-attention reads (SDXL: two encoders, penultimate layers concatenated, plus the
pooled embedding), how to encode from token embeddings (prefix attacks), and which
cross-attention ``to_k`` / ``to_v`` projections exist. On the MMDiT families (``sd3``, ``flux``)
the context is what the transformer's ``context_embedder`` reads and the projections that carry
text are in :func:`~erasekit.pipelines.mmdit.text_projections` (:mod:`erasekit.pipelines.mmdit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from . import mmdit

UNET_FAMILIES = ("sd1", "sd2", "sdxl")
FAMILIES = UNET_FAMILIES + mmdit.MMDIT_FAMILIES


def detect_family(pipe) -> str:
    """``"sd3"`` / ``"flux"`` for an MMDiT transformer pipeline (:func:`~erasekit.pipelines.mmdit.mmdit_family`);
    else ``"sdxl"`` if the pipeline has a second text encoder, ``"sd2"`` for an OpenCLIP encoder, else ``"sd1"``."""
    family = mmdit.mmdit_family(pipe)
    if family is not None:
        return family
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    if getattr(pipe, "unet", None) is None or getattr(pipe, "text_encoder", None) is None:
        raise ConfigError(f"{type(pipe).__name__} has no UNet and text encoder; erasekit edits Stable "
                          "Diffusion-style pipelines (SD 1.x, SD 2.x, SDXL)")
    # SD 2.x's OpenCLIP ViT-H text encoder is converted with plain GELU; CLIP ViT-L (SD 1.x, canvas-mini)
    # uses quick_gelu.
    return "sd2" if pipe.text_encoder.config.hidden_act == "gelu" else "sd1"


@dataclass
class Tokens:
    input_ids: torch.Tensor        # B x 77 (T5: B x max_sequence_length)
    attention_mask: torch.Tensor   # B x 77, 1 for BOS, words and the first EOS (T5: words and EOS, no BOS)

    @property
    def eos_index(self) -> torch.Tensor:
        return self.attention_mask.sum(-1) - 1

    @property
    def last_word_index(self) -> torch.Tensor:
        """Index of the last word token (closed-form.md section 3); 0 (BOS, or T5's EOS) for an empty prompt."""
        return (self.attention_mask.sum(-1) - 2).clamp_min(0)


@dataclass
class Context:
    """What the UNet's cross-attention reads for a batch of prompts."""

    embeds: torch.Tensor                         # B x 77 x D
    pooled: torch.Tensor | None = None           # SDXL: B x 1280 (text_encoder_2's projection)

    def unet_kwargs(self, pipe, size: tuple[int, int] | None = None) -> dict:
        """Keyword arguments for ``pipe.unet(x, t, **kwargs)`` (SDXL's added conditions included)."""
        kw = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            h, w = size or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
            time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=self.embeds.dtype, device=self.embeds.device)
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled,
                                       "time_ids": time_ids.expand(self.embeds.shape[0], 6)}
        return kw

    def __getitem__(self, idx) -> "Context":
        return Context(self.embeds[idx], None if self.pooled is None else self.pooled[idx])

    @staticmethod
    def cat(parts: list["Context"]) -> "Context":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Context(torch.cat([p.embeds for p in parts]), pooled)


def _text_transformer(encoder: nn.Module) -> nn.Module:
    """The module with ``embeddings``/``encoder``/``final_layer_norm`` (transformers 4.x nests it)."""
    return encoder.text_model if hasattr(encoder, "text_model") else encoder


def encode_embeds(encoder: nn.Module, token_embeds: torch.Tensor, eos_index: torch.Tensor,
                  hidden_layer: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a CLIP text encoder from token embeddings (position embeddings are added here).

    Returns (hidden states of ``hidden_layer`` after the final layer norm if it is the last layer,
    pooled EOS output projected when the encoder has a projection). Used by prefix-token attacks
    and AdvUnlearn, whose variables live in the token-embedding space.
    """
    tm = _text_transformer(encoder)
    hidden = tm.embeddings(inputs_embeds=token_embeds)
    n = hidden.shape[1]
    causal = torch.full((n, n), float("-inf"), dtype=hidden.dtype, device=hidden.device).triu(1)
    mask = causal[None, None].expand(hidden.shape[0], 1, n, n)
    states = [hidden]
    for layer in tm.encoder.layers:
        try:  # transformers 5: layer(h, attention_mask) -> tensor
            out = layer(states[-1], attention_mask=mask)
        except TypeError:  # transformers 4: layer(h, attention_mask, causal_attention_mask) -> tuple
            out = layer(states[-1], None, mask)
        states.append(out[0] if isinstance(out, tuple) else out)
    last = tm.final_layer_norm(states[-1])
    seq = last if hidden_layer == -1 else states[hidden_layer]
    pooled = last[torch.arange(last.shape[0], device=last.device), eos_index.to(last.device)]
    if hasattr(encoder, "text_projection"):
        pooled = encoder.text_projection(pooled)
    return seq, pooled


class FamilyAdapter:
    """Per-family text handling for one pipeline (see module docstring)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.family = detect_family(pipe)
        self.mmdit = self.family in mmdit.MMDIT_FAMILIES
        if self.mmdit:   # CLIP tokenizer(s) first, T5 last; ``tokenize()`` is CLIP-L's
            self.tokenizers, self.encoders = mmdit.text_stack(pipe, self.family)
            self.max_sequence_length = mmdit.default_sequence_length(pipe)
            self.segments = mmdit.segments(self.family, self.max_sequence_length, mmdit.has_t5(pipe, self.family))
            self.sequence_length = (77 if self.family == "sd3" else 0) + self.max_sequence_length
            return
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if self.family == "sdxl" else [])
        self.encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if self.family == "sdxl" else [])
        self.sequence_length = self.tokenizers[0].model_max_length   # rows of the context: 77
        self.segments = [mmdit.Segment(0, 0, self.sequence_length)]

    @property
    def device(self) -> torch.device:
        return mmdit.denoiser(self.pipe).device

    @property
    def context_dim(self) -> int:
        if self.mmdit:
            return int(self.pipe.transformer.config.joint_attention_dim)
        return int(self.pipe.unet.config.cross_attention_dim)

    def max_length(self, which: int = 0) -> int:
        """Tokens per prompt of tokenizer ``which``: 77 for CLIP, ``max_sequence_length`` for T5."""
        if self.mmdit and which == mmdit.T5_INDEX[self.family]:
            return self.max_sequence_length
        return self.tokenizers[which].model_max_length

    def tokenize(self, prompts: list[str] | str, which: int = 0) -> Tokens:
        """Tokenise with padding to the encoder's length (:meth:`max_length`); refuses prompts longer than that."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tok, limit = self.tokenizers[which], self.max_length(which)
        enc = tok(prompts, padding="max_length", max_length=limit, truncation=False)
        lengths = [sum(m) for m in enc.attention_mask]   # checked before batching: long rows are ragged
        if max(lengths, default=0) > limit:
            bad = [p for p, n in zip(prompts, lengths) if n > limit]
            raise ConfigError(f"prompt {bad[0][:60]!r} has {max(lengths)} tokens but the text encoder takes "
                              f"at most {limit}: shorten it")
        return Tokens(torch.tensor(enc.input_ids, device=self.device),
                      torch.tensor(enc.attention_mask, device=self.device))

    def token_embedding(self, which: int = 0) -> nn.Embedding:
        return self.encoders[which].get_input_embeddings()

    @torch.no_grad()
    def encode(self, prompts: list[str] | str, batch_size: int = 64) -> Context:
        """Encode prompts exactly as the family's diffusers pipeline does for its UNet."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        parts = [self._encode(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
        return Context.cat(parts)

    def encode_with_grad(self, prompts: list[str] | str) -> Context:
        """As :meth:`encode` but keeps the autograd graph (text-encoder training)."""
        return self._encode([prompts] if isinstance(prompts, str) else list(prompts))

    def _encode(self, prompts: list[str]) -> Context:
        if self.mmdit:
            for which in range(len(self.tokenizers)):   # the pipeline would truncate silently: refuse instead
                self.tokenize(prompts, which)
            return Context(*mmdit.encode(self.pipe, self.family, prompts, self.max_sequence_length))
        if self.family != "sdxl":
            ids = self.tokenize(prompts).input_ids
            return Context(self.encoders[0](ids).last_hidden_state)
        seqs, pooled = [], None
        for i, enc in enumerate(self.encoders):
            ids = self.tokenize(prompts, which=i).input_ids
            out = enc(ids, output_hidden_states=True)
            seqs.append(out.hidden_states[-2])  # SDXL reads the penultimate layer of both encoders
            if i == 1:
                pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
        return Context(torch.cat(seqs, dim=-1), pooled)

    def encode_token_embeds(self, token_embeds: list[torch.Tensor], tokens: list[Tokens],
                            t5_rows: torch.Tensor | None = None) -> Context:
        """Encode from token embeddings, one tensor per text encoder (differentiable).

        SD 3 / Flux: one tensor per CLIP encoder; T5 is not run from embeddings, its rows are ``t5_rows``
        (the plain prompts' T5 rows, :func:`~erasekit.pipelines.mmdit.encode_clip_token_embeds`).
        """
        if self.mmdit:
            if t5_rows is None:
                raise ConfigError(f"encoding from token embeddings on {self.family} pipelines runs the CLIP encoders "
                                  "only: pass `t5_rows`, the T5 rows of the plain prompts (PrefixPrompts does)")
            return Context(*mmdit.encode_clip_token_embeds(self.family, self.encoders, token_embeds, tokens, t5_rows))
        if self.family != "sdxl":
            seq, _ = encode_embeds(self.encoders[0], token_embeds[0], tokens[0].eos_index)
            return Context(seq)
        seqs, pooled = [], None
        for i, enc in enumerate(self.encoders):
            seq, pool = encode_embeds(enc, token_embeds[i], tokens[i].eos_index, hidden_layer=-2)
            seqs.append(seq)
            pooled = pool if i == 1 else pooled
        return Context(torch.cat(seqs, dim=-1), pooled)


def cross_attention_kv(unet: nn.Module) -> dict[str, nn.Linear]:
    """Every cross-attention key/value projection: ``{param-free module name: Linear}``, sorted by name."""
    found = {name: m for name, m in unet.named_modules()
             if isinstance(m, nn.Linear) and (name.endswith("attn2.to_k") or name.endswith("attn2.to_v"))}
    if not found:
        raise ConfigError(f"{type(unet).__name__} has no cross-attention (attn2.to_k / attn2.to_v) projections")
    return dict(sorted(found.items()))

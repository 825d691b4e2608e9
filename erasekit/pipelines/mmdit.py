"""The text side of MMDiT pipelines (Stable Diffusion 3 / 3.5 and Flux): families, encoders, projections.

An MMDiT reads text through a *joint* attention: the prompt's token sequence is mapped into the
transformer's width by one linear map, ``transformer.context_embedder``, and then travels as a
stream of its own beside the image tokens, each block projecting it with ``attn.add_k_proj`` /
``attn.add_v_proj`` (and ``add_q_proj``) into the joint attention and updating it for the next block.
A pooled text vector conditions every block's modulation through ``time_text_embed``.

========  =================================================  ==========================  ===============
family    sequence rows (``Context.embeds``)                 pooled (``Context.pooled``)  text encoders
========  =================================================  ==========================  ===============
``sd3``   77 rows CLIP-L ‖ CLIP-G penultimate (features      CLIP-L ‖ CLIP-G projected    CLIP-L, CLIP-G,
          concatenated, zero-padded to T5's width), then      EOS outputs                  T5
          ``max_sequence_length`` T5 rows
``flux``  ``max_sequence_length`` T5 rows                     CLIP-L projected EOS output   CLIP-L, T5
========  =================================================  ==========================  ===============

Encoding calls the pipeline's own ``encode_prompt``, so the rows are exactly what its denoising
loop feeds the transformer. ``max_sequence_length`` is the pipeline's default (256 for SD3, 512 for
Flux), read from its ``__call__`` signature, so erasure and generation use the same sequence.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError

MMDIT_FAMILIES = ("sd3", "flux")
T5_INDEX = {"sd3": 2, "flux": 1}   # which of the family's tokenizers / encoders is T5


def mmdit_family(pipe) -> str | None:
    """``"sd3"`` or ``"flux"`` for a pipeline with a ``transformer``, None for a UNet pipeline."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return None
    if type(transformer).__name__ == "SD3Transformer2DModel":
        return "sd3"
    if type(transformer).__name__ == "FluxTransformer2DModel":
        return "flux"
    raise ConfigError(f"{type(pipe).__name__} has a {type(transformer).__name__}; erasekit reads the transformer "
                      "pipelines of Stable Diffusion 3 (SD3Transformer2DModel with three text encoders) and Flux "
                      "(FluxTransformer2DModel)")


def denoiser(pipe) -> nn.Module:
    """The network that predicts the noise (or flow): ``pipe.transformer`` on MMDiT, else ``pipe.unet``."""
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def has_t5(pipe, family: str) -> bool:
    """Whether the pipeline has its T5 encoder (SD 3 may be loaded without it: its T5 rows are then zeros)."""
    return family == "flux" or getattr(pipe, "text_encoder_3", None) is not None


def text_stack(pipe, family: str) -> tuple[list, list[nn.Module]]:
    """(tokenizers, text encoders) of an MMDiT pipeline in the pipeline's order (CLIP first, T5 last if loaded)."""
    names = ("", "_2") + (("_3",) if family == "sd3" and has_t5(pipe, family) else ())
    return [getattr(pipe, f"tokenizer{n}") for n in names], [getattr(pipe, f"text_encoder{n}") for n in names]


def default_sequence_length(pipe) -> int:
    """The T5 sequence length the pipeline's ``__call__`` uses unless told otherwise (SFD's one-step SD 3
    sampler: its base pipeline's)."""
    pipe = getattr(pipe, "base_pipeline", None) or pipe
    param = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    if param is None or not isinstance(param.default, int):
        raise ConfigError(f"{type(pipe).__name__}.__call__ has no integer default `max_sequence_length`; erasekit "
                          "reads the Stable Diffusion 3 and Flux pipelines of diffusers")
    return param.default


@dataclass(frozen=True)
class Segment:
    """Rows ``start .. start + length`` of the sequence, tokenised by tokenizer ``which``."""

    which: int
    start: int
    length: int


def segments(family: str, seq_len: int, t5: bool = True) -> list[Segment]:
    """Which rows of ``Context.embeds`` come from which tokenizer (SD3: CLIP rows, then T5 rows). An SD3
    pipeline without T5 has only its CLIP segment: its T5 rows are zeros, which no closed form reads."""
    if family == "sd3":
        return [Segment(0, 0, 77)] + ([Segment(T5_INDEX["sd3"], 77, seq_len)] if t5 else [])
    return [Segment(T5_INDEX["flux"], 0, seq_len)]


def encode(pipe, family: str, prompts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence B x S x D, pooled B x P) of ``prompts`` by the pipeline's own ``encode_prompt`` (with grad)."""
    device = denoiser(pipe).device
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False, max_sequence_length=seq_len)
    else:
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device, num_images_per_prompt=1,
                                               max_sequence_length=seq_len)
    return embeds, pooled


def text_projections(transformer: nn.Module) -> dict[str, nn.Linear]:
    """The linear maps that carry text into the joint attention, ``{module name: Linear}``, sorted by name:
    ``context_embedder`` (encoder rows -> text stream) and every joint block's ``attn.add_k_proj`` /
    ``attn.add_v_proj`` (text stream -> keys and values)."""
    found = {name: m for name, m in transformer.named_modules() if isinstance(m, nn.Linear) and
             (name == "context_embedder" or name.endswith(("attn.add_k_proj", "attn.add_v_proj")))}
    if "context_embedder" not in found:
        raise ConfigError(f"{type(transformer).__name__} has no `context_embedder` linear map: not an SD3/Flux "
                          "MMDiT transformer")
    return dict(sorted(found.items()))


def encode_clip_token_embeds(family: str, encoders: list[nn.Module], token_embeds: list[torch.Tensor], tokens: list,
                             t5_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, pooled) from CLIP token embeddings (differentiable), as ``encode_prompt`` builds them from
    token ids, with ``t5_rows`` (B x max_sequence_length x D, the T5 rows of the plain prompts) in T5's place.

    Prefix attacks and AdvUnlearn put their variables into CLIP's token-embedding space; T5 has another
    vocabulary and tokenisation, so it is not run from those embeddings: its rows come from the prompts as
    given. SD 3: CLIP-L and CLIP-G penultimate hidden states, concatenated and zero-padded to T5's width,
    then ``t5_rows``; pooled: both projected EOS outputs. Flux: ``t5_rows``; pooled: CLIP-L's EOS output.
    """
    from .family import encode_embeds

    if family == "sd3":
        seqs, pools = zip(*[encode_embeds(enc, e, t.eos_index, hidden_layer=-2)
                            for enc, e, t in zip(encoders, token_embeds, tokens)])
        clip = torch.cat(seqs, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_rows.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5_rows.to(clip.device, clip.dtype)], dim=1), torch.cat(pools, dim=-1)
    _, pooled = encode_embeds(encoders[0], token_embeds[0], tokens[0].eos_index)
    return t5_rows.to(pooled.device, pooled.dtype), pooled

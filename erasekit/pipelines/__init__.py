"""Base models, per-family text handling, seeded generation and the Edit object."""

from .edit import Edit, fingerprint, low_rank_factors
from .family import Context, FamilyAdapter, Tokens, cross_attention_kv, detect_family, encode_embeds
from .generation import Sampling, default_sampling, generate, use_sampler
from .loading import load_pipeline, resolve_dtype
from .locking import pipeline_lock
from .one_step import OneStepPipeline, one_step_pipeline  # noqa: F401  (SFD's one-step sampler)

__all__ = ["Edit", "fingerprint", "low_rank_factors", "Context", "FamilyAdapter", "Tokens",
           "cross_attention_kv", "detect_family", "encode_embeds", "Sampling", "generate",
           "use_sampler", "default_sampling", "load_pipeline", "resolve_dtype", "pipeline_lock"]

"""Shared fixtures: tiny random pipelines of the sd1, sd2, sdxl, sd3 and flux architectures, built from config.

No hub: the tokenizer is CLIP's BPE written from open-clip-torch's vocabulary file, and every
component is a real diffusers/transformers class with tiny widths (as diffusers' own tests do).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from erasekit._assets import asset_path

warnings.filterwarnings("error", category=FutureWarning, module="diffusers")
warnings.filterwarnings("error", category=DeprecationWarning, module="diffusers")
warnings.filterwarnings("error", category=FutureWarning, module="transformers")

CANVAS = asset_path("canvas-mini", must_exist=False)


@pytest.fixture(scope="session", autouse=True)
def erasekit_cache(tmp_path_factory):
    """The run cache (training methods' automatic checkpoints) in a temporary folder, not the home folder."""
    import os

    before = os.environ.get("ERASEKIT_CACHE")
    os.environ["ERASEKIT_CACHE"] = str(tmp_path_factory.mktemp("erasekit-cache"))
    yield Path(os.environ["ERASEKIT_CACHE"])
    if before is None:
        os.environ.pop("ERASEKIT_CACHE", None)
    else:
        os.environ["ERASEKIT_CACHE"] = before


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory) -> Path:
    from erasekit.canvas.tokenizer import write_clip_tokenizer

    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _tokenizer(path: Path, pad: str | None = None):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(path)
    if pad is not None:  # SD 2.x pads with "!" (id 0) instead of EOS
        tok.pad_token = pad
    return tok


def _text_encoder(hidden: int = 32, act: str = "quick_gelu", projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=4, norm_num_groups=4, sample_size=16).eval()


def _scheduler():
    from diffusers import DDIMScheduler

    from erasekit.canvas.configs import SCHEDULER

    return DDIMScheduler(**SCHEDULER)


def build_tiny(family: str, tokenizer_dir: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    common = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                  out_channels=4, norm_num_groups=4,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    if family == "sdxl":
        unet = UNet2DConditionModel(**common, cross_attention_dim=64, attention_head_dim=(2, 4),
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
        pipe = StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=_text_encoder(seed=1), text_encoder_2=_text_encoder(projection=True, seed=2),
            tokenizer=_tokenizer(tokenizer_dir), tokenizer_2=_tokenizer(tokenizer_dir, pad="!"),
            unet=unet.eval(), scheduler=_scheduler())
    else:
        sd2 = family == "sd2"
        unet = UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=(2, 4) if sd2 else 4,
                                    use_linear_projection=sd2)
        pipe = StableDiffusionPipeline(
            vae=_vae(), text_encoder=_text_encoder(act="gelu" if sd2 else "quick_gelu"),
            tokenizer=_tokenizer(tokenizer_dir, pad="!" if sd2 else None), unet=unet.eval(),
            scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_t5_tokenizer():
    """A T5 tokenizer (Unigram over single characters, no sentencepiece file, no hub): ``</s>`` closes every
    prompt and ``<pad>`` (id 0) fills the rest, as in T5's own."""
    import string

    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -4.0) for c in chars] + [("\u2581" + c, -3.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _t5(tokenizer, width: int, seed: int = 3):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def _flow_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=4, norm_num_groups=4, sample_size=16, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5).eval()


def pipeline_state(pipe) -> dict:
    """A copy of every weight of every torch module of ``pipe`` (to check later that nothing changed)."""
    import torch

    return {f"{n}/{k}": v.detach().clone() for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)
            for k, v in m.state_dict().items()}


def pipeline_unchanged(before: dict, pipe) -> bool:
    """Whether ``pipe`` holds exactly the weights of ``before`` (:func:`pipeline_state`), no more, no fewer."""
    import torch

    after = pipeline_state(pipe)
    return after.keys() == before.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


def build_tiny_mmdit(family: str, tokenizer_dir: Path):
    """A tiny SD3 (CLIP-L, CLIP-G, T5; 2 joint blocks) or Flux (CLIP-L, T5; 1 joint + 1 single block) pipeline
    with a flow-matching scheduler, shaped as diffusers' own tests build them. SD3's CLIP widths (32 + 32)
    fill T5's width 64, its joint_attention_dim; Flux's T5 width is its joint_attention_dim 32."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)

    t5_tok = tiny_t5_tokenizer()
    torch.manual_seed(0)
    if family == "sd3":
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                            joint_attention_dim=64, pooled_projection_dim=64)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(),
            text_encoder=_text_encoder(projection=True, seed=1), text_encoder_2=_text_encoder(projection=True, seed=2),
            text_encoder_3=_t5(t5_tok, 64), tokenizer=_tokenizer(tokenizer_dir),
            tokenizer_2=_tokenizer(tokenizer_dir, pad="!"), tokenizer_3=t5_tok)
    else:
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
        pipe = FluxPipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(),
                            vae=_flow_vae(), text_encoder=_text_encoder(seed=1), text_encoder_2=_t5(t5_tok, 32),
                            tokenizer=_tokenizer(tokenizer_dir), tokenizer_2=t5_tok)
        pipe.default_sample_size = 16   # native size 16 x this VAE's factor 2 = 32 px (Flux's 128 would give 256)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(params=["sd3", "flux"])
def tiny_mmdit(request, clip_tokenizer_dir):
    """A fresh tiny SD3 and Flux pipeline (function scope: tests may edit it)."""
    return build_tiny_mmdit(request.param, clip_tokenizer_dir)


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def tiny_pipe(request, clip_tokenizer_dir):
    """A fresh tiny pipeline of each family (function scope: tests may edit it)."""
    return build_tiny(request.param, clip_tokenizer_dir)


@pytest.fixture
def tiny_sd1(clip_tokenizer_dir):
    return build_tiny("sd1", clip_tokenizer_dir)


@pytest.fixture(scope="session")
def canvas_pipe():
    """canvas-mini, loaded once per session (tests must not leave edits applied)."""
    if not (CANVAS / "model_index.json").exists():
        pytest.skip("erasekit/assets/canvas-mini is not built")
    from erasekit.pipelines import load_pipeline

    return load_pipeline("canvas-mini")


@pytest.fixture(scope="session")
def canvas_judge():
    from erasekit.eval.judges import CanvasJudge

    return CanvasJudge.load()

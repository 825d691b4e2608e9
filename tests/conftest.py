"""Shared fixtures: tiny random pipelines of the sd1, sd2 and sdxl architectures, built from config.

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

"""Full-size architectures with random weights, built from config with no network.

Speed and memory do not depend on the weights' values, so the benchmarks measure the cost of a
method on SD 1.4's real shapes with these, and the tests check that full-size models get the papers'
presets. The tokenizer is CLIP's BPE from open-clip-torch's vocabulary (:mod:`.tokenizer`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def sd14_random(resolution: int = 512, device: str = "cpu"):
    """A ``StableDiffusionPipeline`` with SD 1.4's UNet and text encoder (random weights, seed 0).

    The VAE is a tiny stand-in (the methods measured with it never decode). ``device="meta"`` builds
    the shapes without allocating their memory (for code that only reads configs and shapes).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .configs import SCHEDULER
    from .tokenizer import write_clip_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                    attention_head_dim=8, layers_per_block=2, sample_size=resolution // 8)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                            intermediate_size=3072, vocab_size=49408, max_position_embeddings=77,
                                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
        vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tempfile.mkdtemp())))
    return StableDiffusionPipeline(vae=vae, text_encoder=text.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)

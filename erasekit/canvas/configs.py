"""Architectures of canvas-mini, its judge and its CLIP: one place, used by the recipes and the tests.

canvas-mini is Stable Diffusion 1.x in miniature: the same component classes and wiring, at
32 x 32 pixels with a 2x AutoencoderKL (16 x 16 x 4 latents) and a 64-wide CLIP text encoder
that keeps SD's full 49,408-token vocabulary, so token ids match Stable Diffusion's.
"""

from __future__ import annotations

IMAGE_SIZE = 32
LATENT_SIZE = 16
TEXT_DIM = 64

VAE = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
    norm_num_groups=16, sample_size=IMAGE_SIZE,
)

UNET = dict(
    sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
    # No attention at 16 x 16: it costs half the training time on a CPU for little gain at this size.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 128), layers_per_block=1,
    cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=16,
)

TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM,
    num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=TEXT_DIM,
    # canvas-mini's identity: kept by transformers in the saved config, it selects canvas-mini's
    # presets (erasekit.presets) however the pipeline is loaded.
    erasekit_world="canvas-mini",
)

# Stable Diffusion's noise schedule and its DDIM settings.
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)

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

# canvas-mini-mmdit: Stable Diffusion 3 in miniature on the same world and the same 16 x 16 x 4 latents
# (canvas-mini's VAE). Its text encoders are the world's two trained CLIP text towers, frozen, as SD 3
# keeps CLIP-L and OpenCLIP-G frozen: canvas-mini's (width 64, SD 3's CLIP-L role, pads with EOS) and
# the canvas CLIP's (width 32, CLIP-G's role, pads with "!"); no T5 (its rows are zeros). So the joint
# attention reads 64 + 32 = 96-wide rows and the pooled vector is 64 + 64 = 128 wide.
MMDIT_TEXT_DIM = TEXT_DIM + 32
MMDIT_POOLED_DIM = TEXT_DIM + 64

MMDIT_TRANSFORMER = dict(
    sample_size=LATENT_SIZE, patch_size=2, in_channels=4, out_channels=4,
    num_layers=6, attention_head_dim=32, num_attention_heads=4,
    joint_attention_dim=MMDIT_TEXT_DIM, caption_projection_dim=128, pooled_projection_dim=MMDIT_POOLED_DIM,
    # The stored position table covers the 8 x 8 patch grid only (SD 3's 96 x 96 table would be 3.5 MB).
    pos_embed_max_size=LATENT_SIZE // 2,
)

# Rectified flow as SD 3 trains and samples it; shift 1 (no shift) fits 64 image tokens, far fewer
# than the 4,096 at which SD 3 uses shift 3.
MMDIT_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0)

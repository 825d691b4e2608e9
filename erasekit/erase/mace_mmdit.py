"""MACE on MMDiT transformers (SD 3 / 3.5, Flux): the three stages on the map that reads the text first.

On a UNet MACE edits every cross-attention ``to_k`` / ``to_v``: each reads the text encoder's rows
``e`` directly, so CFR (eq. 3) and the fusion (eq. 8) are least squares over those rows, and the LoRAs
of stage 2 sit on the same maps. In an MMDiT only ``context_embedder`` (``E``: encoder rows -> text
stream) reads ``e``; every block's ``add_k_proj`` / ``add_v_proj`` reads a text stream that depends on
the timestep and the image (docs/backbones.md, "Closed form"). So MACE runs with ``W = E``:

1. **CFR** is UCE's closed form on ``E`` with MACE's rows (the aligned rows of each concept prompt and
   its mapped prompt, segment by segment: SD 3's CLIP rows and T5 rows, Flux's T5 rows), exact as on a
   UNet; the pooled projection ``time_text_embed.text_embedder.linear_1`` gets the same objective with
   one row per prompt (each concept prompt's pooled vector onto its mapped prompt's, preserve prompts
   kept), since on an MMDiT the pooled CLIP vector also carries the concept (to every block's modulation).
2. **One LoRA per concept on E** (rank ``r``), trained with eq. 6's loss on the joint attention's
   image-to-text probabilities at the concept's rows (:mod:`erasekit.erase.joint_attention`: the joint
   softmax's text columns for the image queries, every block, Flux's single-stream blocks included),
   restricted to the concept's mask at image-token resolution. Noisy latents are flow matching's
   ``x_s = (1 - s) z + s eps`` with ``s = shifted(t / T)`` on the scheduler's training grid; the
   relation-focal ``f(t)`` draws ``t`` as on the UNet's DDPM grid (the same noise-level index).
3. **Fusion** is eq. 8 with ``W = E`` and the LoRAs on ``E``: the same closed form over the encoder rows,
   exact, stored as factors. The pooled projection keeps stage 1's solution (no LoRA reads it).

The attention the LoRA lowers is read in every block, but only ``E`` is trained: the blocks see the
concept through the text stream ``E`` starts, as in UCE's MMDiT edit.
"""

from __future__ import annotations

import torch


def pooled_factors(pipe, enc, s: dict) -> dict:
    """CFR on the pooled projection: exact factors ``{key: (U, V)}`` (module docstring, stage 1)."""
    from .closed_form import UCEFitter
    from .uce_mmdit import POOLED

    old = [t.format(c) for c in s["concepts"] for t in s["templates"]]
    new = [t.format(m) for m in s["mapping"] for t in s["templates"]]
    keys = enc.pooled(old)
    fitter = UCEFitter(keys.shape[1], s["lamb"])
    fitter.update(keys, enc.pooled(new))
    if s["preserve"] and s["preserve_scale"] > 0:
        fitter.update(enc.pooled(s["preserve"]), scale=s["preserve_scale"])
    w = pipe.transformer.get_parameter(POOLED.split("/", 1)[1]).detach()
    return {POOLED: fitter.solve().factors(w)}


class FlowNoiser:
    """Noisy latents and the transformer's call at a timestep index ``t`` of the training grid (stage 2)."""

    def __init__(self, pipe):
        from ..pipelines.flow import FlowModel

        self.fm = FlowModel(pipe)
        self.num_train_timesteps = self.fm.n_train

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.fm.grid_sigma(t + 1)   # index 0..T-1 -> grid timestep 1..T

    def __call__(self, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ctx) -> None:
        from ..pipelines.flow import noisy

        device = self.fm.transformer.device
        s = self.sigma(t)
        x = noisy(z, noise, s).to(device)
        self.fm.transformer(**self.fm.kwargs(x, s.to(device), ctx))

    def grid(self) -> tuple[int, int]:
        """The latent grid (VAE latent rows x columns) masks are given at."""
        return self.fm.latent, self.fm.latent

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.fm.encode_images(x).float().cpu()

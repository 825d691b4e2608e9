"""Forget and retain image sets for fine-tuning methods, held as UNet-space latents with prompts (SD 3 /
Flux: the transformer's latents, Flux's packed into 2 x 2 patches as its pipeline returns them with
``output_type="latent"``).

Two sources (salun.md section 4):

- :func:`generate_set`: the pipeline draws its own images from prompts with fixed seeds, as SalUn
  builds its nudity sets ("a photo of a nude person" / "... wearing clothes"). The final latents
  are kept directly (``output_type="latent"``), which skips a VAE decode-encode round trip.
- :func:`folder_set`: a folder of images (png, jpg, jpeg, webp); an image's prompt is the text of
  ``<stem>.txt`` beside it, else ``default_prompt``. Images are resized (shorter side) and centre
  cropped to the model's native size, scaled to [-1, 1] and encoded with the VAE (posterior mean,
  times the VAE's scaling factor).

Each set records how it was made (``protocol``), so the Edit's manifest says what data it saw.
:func:`cycle_indices` is the shuffled, cycling loader: position ``p`` of the stream depends only on
``(seed, p)``, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class LatentSet:
    """Images as latents in the UNet's space (``N x C x h x w``), one prompt each."""

    latents: torch.Tensor
    prompts: list[str]
    protocol: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, idx: torch.Tensor, device=None) -> tuple[torch.Tensor, list[str]]:
        return self.latents[idx].to(device), [self.prompts[int(i)] for i in idx]


def generate_set(pipe, prompts: list[str], per_prompt: int, seed: int = 0, sampling=None,
                 progress: bool = False, name: str = "images") -> LatentSet:
    """``per_prompt`` images of each prompt from ``pipe`` itself, seeds ``seed, seed + 1, ...``."""
    from ..pipelines.generation import Sampling, generate

    if not prompts or per_prompt < 1:
        raise ConfigError(f"the {name} set needs at least one prompt and one image per prompt "
                          f"(got {len(prompts)} prompts, {per_prompt} per prompt)")
    sampling = sampling or Sampling()
    rep = [p for p in prompts for _ in range(per_prompt)]
    seeds = list(range(seed, seed + len(rep)))
    latents = generate(pipe, rep, seeds, sampling, progress=progress, output_type="latent")
    protocol = {"source": "generated", "prompts": list(prompts), "per_prompt": per_prompt,
                "seeds": [seed, seed + len(rep) - 1], "sampling": sampling.to_dict()}
    return LatentSet(torch.stack(list(latents)).float().cpu(), rep, protocol)


def _load_image(path: Path, size: int) -> torch.Tensor:
    from PIL import Image

    im = Image.open(path).convert("RGB")
    scale = size / min(im.size)
    im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    im = im.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0


@torch.no_grad()
def folder_set(pipe, folder: str | Path, default_prompt: str | None = None, batch_size: int = 16,
               name: str = "images") -> LatentSet:
    """Encode every image of ``folder`` with the pipeline's VAE (see module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"the {name} folder {folder} does not exist: give a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"the {name} folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}): "
                          "add images or generate them from prompts instead")
    prompts = []
    for f in files:
        txt = f.with_suffix(".txt")
        if txt.exists():
            prompts.append(txt.read_text().strip())
        elif default_prompt is not None:
            prompts.append(default_prompt)
        else:
            raise ConfigError(f"{f.name} in the {name} folder has no caption: add {txt.name} beside it "
                              "or give prompts")
    from ..pipelines.flow import FlowModel
    from ..pipelines.mmdit import mmdit_family

    vae = pipe.vae
    flow = FlowModel(pipe) if mmdit_family(pipe) is not None else None   # SD 3 / Flux: the transformer's layout
    size = flow.size if flow is not None else pipe.unet.config.sample_size * pipe.vae_scale_factor
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    parts = []
    for i in range(0, len(files), batch_size):
        x = torch.stack([_load_image(f, size) for f in files[i:i + batch_size]])
        mean = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
        latents = ((mean - shift) * scale).float()
        parts.append((flow.pack(latents) if flow is not None else latents).cpu())
    digest = hashlib.sha256("".join(f.name for f in files).encode()).hexdigest()[:12]
    protocol = {"source": "folder", "path": str(folder), "images": len(files), "names_sha256": digest}
    return LatentSet(torch.cat(parts), prompts, protocol)


def cycle_indices(n: int, batch_size: int, position: int, seed: int) -> torch.Tensor:
    """Batch ``position`` of an endless stream of shuffled passes (epochs) over ``range(n)``."""
    start = position * batch_size
    out, perms = [], {}
    for j in range(start, start + batch_size):
        epoch = j // n
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n, generator=gen)
        out.append(perms[epoch][j % n])
    return torch.stack(out)


"""Recipes that train canvas-mini: ``python -m erasekit.canvas.train {vae,diffusion,judge,clip,all}``.

Order (as SD was built): the VAE first, then the text encoder and UNet together on VAE latents with
10 % caption dropout (so classifier-free guidance works), min-SNR-5 loss weighting and an EMA of
the weights. Every stage is seeded, checkpoints atomically (safetensors) every ``--ckpt-every``
steps and resumes from its last checkpoint when started again with the same ``--run`` folder, so
a CPU run can span several sessions. ``--export`` writes the diffusers pipeline directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._io import load_optimizer_tensors, load_tensors, optimizer_tensors, save_tensors
from . import configs as C
from .data import CanvasSet, load_or_build



def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _checkpoint(path: Path, step: int, modules: dict, opt, extra: dict | None = None) -> None:
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    opt_t, opt_s = optimizer_tensors(opt)
    tensors.update(opt_t)
    save_tensors(path, tensors, {"step": step, "optim": opt_s, "rng": torch.get_rng_state().tolist(),
                                 **(extra or {})})


def _resume(path: Path, modules: dict, opt) -> int:
    if not path.exists():
        return 0
    tensors, meta = load_tensors(path)
    for name, m in modules.items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    load_optimizer_tensors(opt, tensors, json.loads(meta["optim"]))
    torch.set_rng_state(torch.tensor(json.loads(meta["rng"]), dtype=torch.uint8))
    return int(meta["step"])


# ---------------------------------------------------------------------------------------------
def train_vae(run: Path, steps: int, batch: int, lr: float, seed: int, ckpt_every: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    data = load_or_build(run / "train.npz", per_cell=100)
    vae = AutoencoderKL(**C.VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    ckpt = run / "vae.ckpt.safetensors"
    start = _resume(ckpt, {"vae": vae}, opt)
    x_all = _to_tensor(data.images)
    bar = tqdm(range(start, steps), desc="vae", initial=start, total=steps)
    for step in bar:
        x = x_all[torch.randint(len(x_all), (batch,))]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            _checkpoint(ckpt, step + 1, {"vae": vae}, opt)
    return vae


def _load_vae(run: Path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**C.VAE)
    tensors, _ = load_tensors(run / "vae.ckpt.safetensors")
    vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_posteriors(vae, data, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of every training image, encoded ``batch`` images at a time."""
    means, stds = [], []
    for i in range(0, len(data), batch):
        post = vae.encode(_to_tensor(data.images[i:i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_latents(run: Path, data: CanvasSet) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Posterior mean and std of every training image, and the scaling factor 1 / std(z)."""
    path = run / "latents.safetensors"
    if path.exists():
        t, meta = load_tensors(path)
        return t["mean"], t["std"], float(meta["scaling_factor"])
    mean, std = encode_posteriors(_load_vae(run), data)
    scaling = float(1.0 / (mean + std * torch.randn_like(std)).std())
    save_tensors(path, {"mean": mean, "std": std}, {"scaling_factor": repr(scaling)})
    return mean, std, scaling


def _tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids


def train_diffusion(run: Path, steps: int, batch: int, lr: float, seed: int, ckpt_every: int,
                    export_every: int, cfg_dropout: float = 0.1):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel, compute_snr
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .tokenizer import write_clip_tokenizer
    from .world import OBJECTS, PARAPHRASES, STYLES, caption

    torch.manual_seed(seed)
    data = load_or_build(run / "train.npz", per_cell=100)
    mean, std, scaling = encode_latents(run, data)
    tok_dir = write_clip_tokenizer(run / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    # Every caption a cell can get, tokenised once: ids[cell, template], plus the empty prompt.
    n_t = len(PARAPHRASES)
    texts = [caption(OBJECTS[o], STYLES[s], t) for o in range(len(OBJECTS))
             for s in range(len(STYLES)) for t in PARAPHRASES]
    ids = _tokenize(tokenizer, texts).view(len(OBJECTS) * len(STYLES), n_t, 77)
    empty = _tokenize(tokenizer, [""])[0]
    cell = torch.from_numpy(data.objects * len(STYLES) + data.styles)

    unet = UNet2DConditionModel(**C.UNET)
    text_encoder = CLIPTextModel(CLIPTextConfig(**C.TEXT_ENCODER))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema_unet = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True)
    ema_text = EMAModel(text_encoder.parameters(), decay=0.999, use_ema_warmup=True)
    noise_sched = DDPMScheduler(**{k: v for k, v in C.SCHEDULER.items()
                                   if k not in ("set_alpha_to_one", "steps_offset")})
    ckpt = run / "diffusion.ckpt.safetensors"
    mods = {"unet": unet, "text": text_encoder}
    start = _resume(ckpt, mods, opt)
    if start:
        t, _ = load_tensors(ckpt)
        for name, ema, model in (("ema_unet", ema_unet, unet), ("ema_text", ema_text, text_encoder)):
            shadow = [t[f"{name}.{i}"] for i in range(len(list(model.parameters())))]
            ema.shadow_params = shadow
            ema.optimization_step = start
    gen = torch.Generator().manual_seed(seed + start)
    bar = tqdm(range(start, steps), desc="diffusion", initial=start, total=steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 200)
        idx = torch.randint(len(data), (batch,), generator=gen)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        tmpl = torch.randint(n_t, (batch,), generator=gen)
        tokens = ids[cell[idx], tmpl]
        drop = torch.rand(batch, generator=gen) < cfg_dropout
        tokens[drop] = empty
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=gen)
        z_t = noise_sched.add_noise(z, noise, t)
        pred = unet(z_t, t, text_encoder(tokens).last_hidden_state).sample
        snr = compute_snr(noise_sched, t)
        weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 (Hang et al. 2023), epsilon target
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % ckpt_every == 0 or done == steps:
            shadows = {f"ema_unet.{i}": p for i, p in enumerate(ema_unet.shadow_params)}
            shadows.update({f"ema_text.{i}": p for i, p in enumerate(ema_text.shadow_params)})
            _checkpoint(ckpt, done, mods, opt, {"scaling_factor": repr(scaling)})
            t_all, meta = load_tensors(ckpt)
            t_all.update(shadows)
            save_tensors(ckpt, t_all, {k: v for k, v in meta.items()})
        if done % export_every == 0 or done == steps:
            export_pipeline(run, run / "pipeline", step=done)


def export_pipeline(run: Path, out: Path, step: int | None = None) -> Path:
    """Write the diffusers ``StableDiffusionPipeline`` directory from the EMA weights of a run."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .tokenizer import write_clip_tokenizer

    t, meta = load_tensors(run / "diffusion.ckpt.safetensors")
    unet = UNet2DConditionModel(**C.UNET)
    text_encoder = CLIPTextModel(CLIPTextConfig(**C.TEXT_ENCODER))
    for name, model in (("ema_unet", unet), ("ema_text", text_encoder)):
        for i, p in enumerate(model.parameters()):
            p.data.copy_(t[f"{name}.{i}"])
    vae = _load_vae(run)
    vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(run / "tokenizer"),
        unet=unet, scheduler=DDIMScheduler(**C.SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # Ship the tokenizer as CLIP's vocab.json + merges.txt (1.5 MB instead of a 3.6 MB tokenizer.json).
    shutil.rmtree(tmp / "tokenizer")
    write_clip_tokenizer(tmp / "tokenizer")
    (tmp / "training_step.json").write_text(json.dumps({"step": step or int(meta["step"])}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m erasekit.canvas.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["vae", "diffusion", "export", "judge", "clip"])
    p.add_argument("--run", type=Path, default=Path("runs/canvas"), help="run folder (checkpoints, caches)")
    p.add_argument("--steps", type=int, default=None, help="total steps of the stage")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--export-every", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="export folder (default: <run>/pipeline)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.run.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.stage == "vae":
        train_vae(a.run, a.steps or 600, a.batch, a.lr or 1e-3, a.seed, a.ckpt_every)
    elif a.stage == "diffusion":
        train_diffusion(a.run, a.steps or 8000, a.batch, a.lr or 4e-4, a.seed, a.ckpt_every, a.export_every)
    elif a.stage == "export":
        export_pipeline(a.run, a.out or a.run / "pipeline")
    elif a.stage == "judge":
        from .judge import train_judge
        train_judge(a.run, a.steps or 2000, a.batch, a.lr or 2e-3, a.seed, a.ckpt_every)
    elif a.stage == "clip":
        from .clip import train_clip
        train_clip(a.run, a.steps or 1500, a.batch, a.lr or 1e-3, a.seed, a.ckpt_every)
    print(f"{a.stage}: done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

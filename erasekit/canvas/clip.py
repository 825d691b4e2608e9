"""The canvas CLIP: a small open_clip CLIP trained contrastively on canvas images and captions.

It gives canvas-mini what CLIP gives Stable Diffusion in a benchmark: a text-image similarity for
the CLIP score and an image feature space for FID (the Inception network's role; no ImageNet
weights can be downloaded here, and Inception features of 32 x 32 drawings would mean little).

Architecture (``ARCH``): a stock ``open_clip.CLIP`` with a custom config, a 2-layer ViT for
32 x 32 images (8 x 8 patches, width 64) and a 2-layer text transformer of width 32 that keeps
CLIP's full 49,408-token BPE vocabulary and context 77, so ``open_clip.tokenize`` is its tokenizer.
Images are scaled to [-1, 1] (mean = std = 0.5), as canvas-mini and the canvas judge use them.

Recipe (``python -m erasekit.canvas.train clip --run RUN --threads 1``): the symmetric InfoNCE
loss of CLIP (Radford et al. 2021, eq. in Fig. 3; ``open_clip.loss.ClipLoss``) on batches of
*distinct* (object, style) cells, one image and one random caption paraphrase each (two images of
one cell in a batch would be false negatives), AdamW with warm-up and cosine decay, the canvas
judge's augmentation (colour jitter, blur, shift, noise) so generated images are in distribution.
The training images are ``RUN/train.npz`` (built if absent; any canvas run's ``train.npz`` is the
same data). Weights are saved in float16 safetensors (~3.5 MB) with a JSON config under
``RUN/clip``, including zero-shot style/object accuracy on held-out renders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

ARCH = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
)
MEAN = STD = (0.5, 0.5, 0.5)
PROMPT = "A {object} image in {style} style."


def build_clip(arch: dict = ARCH):
    """A randomly initialised ``open_clip.CLIP`` of the canvas architecture."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    return CLIP(arch["embed_dim"], CLIPVisionCfg(**arch["vision_cfg"]), CLIPTextCfg(**arch["text_cfg"]))


def encode_text_short(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` computed on the tokens up to the longest end token of the batch.

    The text transformer is causal and pools at the end token, so the positions after it cannot
    change the result: dropping them gives the same features (up to float rounding) at a fraction
    of the cost of all 77 positions. Used for training speed only.
    """
    n = int(tokens.argmax(dim=-1).max()) + 1
    x = model.token_embedding(tokens[:, :n]) + model.positional_embedding[:n]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0]), tokens[:, :n].argmax(dim=-1)]
    return x @ model.text_projection


def _lr_factor(step: int, steps: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_clip(run: Path, steps: int, batch: int, lr: float, seed: int, ckpt_every: int):
    """Train the canvas CLIP in ``run`` (resumable) and write ``run/clip``; returns the model."""
    import open_clip
    from open_clip.loss import ClipLoss

    from .data import load_or_build
    from .judge import _augment
    from .train import _checkpoint, _resume, _to_tensor
    from .world import OBJECTS, PARAPHRASES, STYLES, caption

    run = Path(run)
    torch.manual_seed(seed)
    data = load_or_build(run / "train.npz", per_cell=100)
    n_cells = len(OBJECTS) * len(STYLES)
    batch = min(batch, n_cells)
    cell = data.objects * len(STYLES) + data.styles
    members = [np.flatnonzero(cell == c) for c in range(n_cells)]
    texts = [caption(OBJECTS[c // len(STYLES)], STYLES[c % len(STYLES)], t)
             for c in range(n_cells) for t in PARAPHRASES]
    tokens = open_clip.tokenize(texts).view(n_cells, len(PARAPHRASES), -1)
    x_all = _to_tensor(data.images)

    model = build_clip()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    ckpt = run / "clip.ckpt.safetensors"
    start = _resume(ckpt, {"clip": model}, opt)
    gen = torch.Generator().manual_seed(seed + start)
    rng = np.random.default_rng(seed + start)
    loss_fn = ClipLoss()
    model.train()
    bar = tqdm(range(start, steps), desc="clip", initial=start, total=steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * _lr_factor(step, steps)
        cells = rng.choice(n_cells, size=batch, replace=False)
        idx = torch.from_numpy(np.array([rng.choice(members[c]) for c in cells]))
        tmpl = torch.from_numpy(rng.integers(len(PARAPHRASES), size=batch))
        img = model.encode_image(_augment(x_all[idx], gen), normalize=True)
        txt = torch.nn.functional.normalize(encode_text_short(model, tokens[torch.from_numpy(cells), tmpl]), dim=-1)
        loss = loss_fn(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            _checkpoint(ckpt, step + 1, {"clip": model}, opt)
    model.eval()
    acc = zero_shot_accuracy(model)
    save_clip(model, run / "clip", {"steps": steps, "batch": batch, "lr": lr, "seed": seed,
                                    "heldout_zero_shot_accuracy": acc})
    print(f"clip: held-out zero-shot accuracy style {acc['style']:.3f} object {acc['object']:.3f}", flush=True)
    return model


@torch.no_grad()
def zero_shot_accuracy(model, per_cell: int = 1) -> dict:
    """Zero-shot style and object accuracy on held-out renders (seeds never used in training).

    Each image is matched against the 100 cell prompts; its style (object) counts as right when
    the best prompt names the right style (object).
    """
    import open_clip

    from .data import build
    from .train import _to_tensor
    from .world import OBJECTS, STYLES, caption

    data = build(per_cell, heldout=True)
    prompts = [caption(o, s) for o in OBJECTS for s in STYLES]
    txt = model.encode_text(open_clip.tokenize(prompts), normalize=True)
    img = model.encode_image(_to_tensor(data.images), normalize=True)
    best = (img @ txt.T).argmax(dim=1).numpy()
    return {"style": float((best % len(STYLES) == data.styles).mean()),
            "object": float((best // len(STYLES) == data.objects).mean()),
            "n_images": len(data), "protocol": f"held-out renders, {per_cell} per cell, top-1 of 100 prompts"}


def save_clip(model, out: Path, info: dict) -> Path:
    """Write ``out/model.safetensors`` (float16) and ``out/config.json``."""
    from .._io import save_tensors, write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "model.safetensors", {k: v.half() for k, v in model.state_dict().items()},
                 {"format": "erasekit.canvas-clip/1"})
    config = {"architecture": "open_clip.CLIP", **ARCH, "image_mean": list(MEAN), "image_std": list(STD),
              "tokenizer": "open_clip.tokenize (CLIP BPE, context 77)", "dtype": "float16", **info}
    write_text_atomic(out / "config.json", json.dumps(config, indent=1))
    return out


def load_clip(path: str | Path | None = None) -> tuple[torch.nn.Module, dict, Path]:
    """The canvas CLIP (float32, eval mode), its ``config.json`` and its folder: the shipped one
    (``erasekit/assets/canvas-clip``) unless ``path`` names a trained one. The evaluation wraps it
    as a ClipEncoder (:func:`erasekit.eval.clip_score.load_canvas_clip`)."""
    from .._assets import read_weights

    state, cfg, path = read_weights("canvas-clip", "canvas CLIP", path, "python -m erasekit.canvas.train clip --run RUN")
    model = build_clip({k: cfg[k] for k in ("embed_dim", "vision_cfg", "text_cfg")})
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval(), cfg, path

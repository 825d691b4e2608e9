"""Recipe that trains canvas-mini-mmdit: ``python -m erasekit.canvas.train_mmdit {train,export,check}``.

canvas-mini-mmdit is a real ``StableDiffusion3Pipeline`` directory at canvas-mini's size: a small
``SD3Transformer2DModel`` (``configs.MMDIT_TRANSFORMER``) on canvas-mini's VAE latents (16 x 16 x 4),
read through the world's two trained CLIP text towers, frozen as SD 3 keeps its CLIP encoders frozen:

- ``text_encoder`` (SD 3's CLIP-L role): canvas-mini's text encoder (width 64; pads with EOS), with an
  identity ``text_projection`` so its pooled vector is its EOS output;
- ``text_encoder_2`` (OpenCLIP-G's role): the canvas CLIP's open_clip text tower converted to
  ``CLIPTextModelWithProjection`` exactly (:func:`open_clip_text_to_hf`; pads with ``"!"`` as open_clip
  pads with id 0);
- no T5: ``text_encoder_3=None``, so the pipeline's 256 T5 rows are zeros, in training as in sampling.

Both encoders' weights are rounded to float16 (the canvas CLIP's are float16 already) and shipped in
float16; ``load_pipeline`` reads them back as float32, exactly the values the transformer trained on.

Training (``train``) is SD 3's rectified flow: ``x_s = (1 - s) x0 + s eps`` with ``s`` drawn
logit-normal(0, 1) (SD 3's best schedule, Esser et al. 2024, sec. 3.1) and shifted as the scheduler
shifts, the transformer regressing the velocity ``eps - x0`` with an unweighted MSE. Batches are
random training renders (``RUN/train.npz``, the data canvas-mini trains on) encoded by canvas-mini's
VAE (a posterior sample, shifted by the latents' mean and scaled as the pipeline decodes them), with
a random caption paraphrase, dropped to the empty prompt 10 % of the time for classifier-free guidance.
The prompt rows are the pipeline's own ``encode_prompt`` output, computed once for every caption.
AdamW with warm-up, gradient clipping and an EMA of the transformer. The run is seeded, float32, uses
a GPU when one is visible (never required), checkpoints atomically every ``--ckpt-every`` steps with
its optimizer, EMA and random-generator states, and resumes from the last checkpoint when started
again with the same ``--run`` folder, on the same batches as an uninterrupted run.

``export`` writes the diffusers folder from the EMA weights (``erasekit.load_pipeline`` reads it as
family ``sd3``); ``check`` measures it with the canvas judge (``erasekit.canvas.check``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._io import load_optimizer_tensors, load_tensors, optimizer_tensors, save_tensors, write_text_atomic
from . import configs as C
from .data import load_or_build

LOGIT_MEAN, LOGIT_STD = 0.0, 1.0     # SD 3's logit-normal noise-level density
WARMUP = 200
WORLD = "canvas-mini-mmdit"   # erasekit_world of its text encoder: selects its preset provider
TARGET = 0.95    # judge-recognised share of generations, style and object, that the shipped model must reach


# -- the text encoders ------------------------------------------------------------------------------------
def open_clip_text_to_hf(model):
    """The text tower of an ``open_clip.CLIP`` as a ``transformers.CLIPTextModelWithProjection`` with the
    same function: its ``text_embeds`` equal ``model.encode_text`` for tokens padded with id 0 (open_clip's
    padding), as SD 3's OpenCLIP-G encoder was converted. Pre-LN blocks with exact GELU, a causal mask,
    pooling at the first end token, then the text projection."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sd = {k: v.detach().float() for k, v in model.state_dict().items() if not k.startswith("visual")}
    width = sd["token_embedding.weight"].shape[1]
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    cfg = CLIPTextConfig(vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=width,
                         intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                         num_hidden_layers=layers, num_attention_heads=model.transformer.resblocks[0].attn.num_heads,
                         max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act="gelu",
                         layer_norm_eps=1e-5, projection_dim=sd["text_projection"].shape[1],
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    out = {"text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
           "text_model.final_layer_norm.weight": sd["ln_final.weight"],
           "text_model.final_layer_norm.bias": sd["ln_final.bias"],
           "text_projection.weight": sd["text_projection"].T.contiguous()}
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for j, part in enumerate(("q", "k", "v")):
            out[f"{dst}self_attn.{part}_proj.weight"] = sd[src + "attn.in_proj_weight"].chunk(3)[j]
            out[f"{dst}self_attn.{part}_proj.bias"] = sd[src + "attn.in_proj_bias"].chunk(3)[j]
        for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[f"{dst}{a}.weight"] = sd[f"{src}{b}.weight"]
            out[f"{dst}{a}.bias"] = sd[f"{src}{b}.bias"]
    enc = CLIPTextModelWithProjection(cfg)
    missing, unexpected = enc.load_state_dict(out, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise RuntimeError(f"open_clip -> CLIP conversion left keys unset: {missing} {unexpected}")
    return enc.eval().requires_grad_(False)


def text_encoders():
    """(text_encoder, tokenizer, text_encoder_2, tokenizer_2) from the shipped canvas-mini and canvas CLIP."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .._assets import asset_path
    from .clip import load_clip

    mini = asset_path("canvas-mini")
    base = CLIPTextModel.from_pretrained(mini / "text_encoder")
    cfg = base.config
    # the model's own world name (erasekit.canvas.mmdit_presets: canvas-mini's world, under this model's name)
    cfg.erasekit_world = WORLD
    te = CLIPTextModelWithProjection(cfg)
    te.text_model.load_state_dict(base.state_dict())
    with torch.no_grad():
        te.text_projection.weight.copy_(torch.eye(cfg.hidden_size, cfg.projection_dim).T)
    tok = CLIPTokenizer.from_pretrained(mini / "tokenizer")
    clip, _, _ = load_clip()
    tok2 = CLIPTokenizer.from_pretrained(mini / "tokenizer")
    tok2.pad_token = "!"
    encoders = te.eval().requires_grad_(False), open_clip_text_to_hf(clip)
    for enc in encoders:   # float16 values (shipped in float16: half the bytes), trained on as float32
        for p in enc.parameters():
            p.data = p.data.half().float()
    return encoders[0], tok, encoders[1], tok2


def canvas_vae():
    """canvas-mini's AutoencoderKL (frozen)."""
    from diffusers import AutoencoderKL

    from .._assets import asset_path

    return AutoencoderKL.from_pretrained(asset_path("canvas-mini") / "vae").eval().requires_grad_(False)


def build_pipeline(transformer, shift_factor: float = 0.0, encoders=None, vae=None):
    """The ``StableDiffusion3Pipeline`` around ``transformer`` (no T5), on canvas-mini's VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    te, tok, te2, tok2 = encoders or text_encoders()
    vae = vae or canvas_vae()
    vae.register_to_config(shift_factor=float(shift_factor))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**C.MMDIT_SCHEDULER), vae=vae,
        text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- data ------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_latents(run: Path, data, vae) -> tuple[torch.Tensor, torch.Tensor, float]:
    """VAE posterior mean and std of every training image (cached), and the latents' mean (SD 3's shift)."""
    from .train import encode_posteriors

    path = run / "mmdit_latents.safetensors"
    if path.exists():
        t, meta = load_tensors(path)
        if len(t["mean"]) == len(data):
            return t["mean"], t["std"], float(meta["shift_factor"])
    mean, std = encode_posteriors(vae, data)
    shift = float(mean.mean())
    save_tensors(path, {"mean": mean, "std": std}, {"shift_factor": repr(shift)})
    return mean, std, shift


@torch.no_grad()
def caption_rows(pipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pipeline's prompt rows for every caption a cell can get and for the empty prompt:
    (embeds cells x templates x S x D, pooled cells x templates x P, empty embeds S x D, empty pooled P)."""
    from ..pipelines.mmdit import default_sequence_length, encode
    from .world import OBJECTS, PARAPHRASES, STYLES, caption

    seq = default_sequence_length(pipe)
    texts = [caption(OBJECTS[o], STYLES[s], t) for o in range(len(OBJECTS)) for s in range(len(STYLES))
             for t in PARAPHRASES]
    embeds, pooled = encode(pipe, "sd3", texts, seq)
    e0, p0 = encode(pipe, "sd3", [""], seq)
    n = len(OBJECTS) * len(STYLES)
    return embeds.view(n, len(PARAPHRASES), *embeds.shape[1:]), pooled.view(n, len(PARAPHRASES), -1), e0[0], p0[0]


# -- training on the repeated T5 rows once ---------------------------------------------------------------
def collapse_repeated_rows(rows: torch.Tensor, *more: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Cut the run of identical trailing prompt rows (a T5-less SD 3 pipeline's 256 zero T5 rows) down to one
    row. Returns ``(copies, [rows, *more] cut)``; ``copies`` is how many rows the kept last row stands for
    (1 when the trailing rows differ). Equality is exact: the rows are the pipeline's own zeros."""
    n = rows.shape[-2]
    copies = 1
    while copies < n and all(torch.equal(t[..., n - copies - 1, :], t[..., -1, :]) for t in (rows, *more)):
        copies += 1
    return copies, [t[..., : n - copies + 1, :] for t in (rows, *more)]


class RepeatedLastRowAttention:
    """SD 3's joint attention for a text stream whose last row stands for ``copies`` identical rows.

    Identical text rows stay identical through every joint block (the text stream has no position
    embedding, and each block maps rows one by one except in the attention), and ``copies`` identical keys
    with equal values weigh in every softmax as one key whose logit is raised by ``log(copies)``. So the
    transformer on the collapsed rows with this bias computes exactly what it computes on all rows: the
    same outputs and gradients (``tests/test_canvas_mmdit_recipe.py`` checks the equality), here at about
    a third of the sequence (64 image + 77 CLIP + 1 instead of 64 + 77 + 256 rows). Training only: the
    exported pipeline samples with diffusers' own processor on all rows."""

    def __init__(self, copies: int):
        self.log_copies = math.log(copies)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[:2]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        cq, ck = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(1, 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
        bias[..., -1] = self.log_copies
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        img, txt = out[:, :n_img], out[:, n_img:]
        img = attn.to_out[1](attn.to_out[0](img))
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return img, txt


# -- checkpoints -----------------------------------------------------------------------------------------
def _save(path: Path, step: int, transformer, ema, opt, gen: torch.Generator, shift: float) -> None:
    tensors = {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
    tensors.update({f"ema.{i}": p for i, p in enumerate(ema.shadow_params)})
    opt_t, opt_s = optimizer_tensors(opt)
    tensors.update(opt_t)
    tensors["generator_state"] = gen.get_state()
    save_tensors(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                 {"step": str(step), "optim": opt_s, "shift_factor": repr(shift),
                  "transformer_config": json.dumps(dict(transformer.config))})


def _load(path: Path, transformer, ema, opt, gen: torch.Generator) -> int:
    tensors, meta = load_tensors(path)
    transformer.load_state_dict({k[12:]: v for k, v in tensors.items() if k.startswith("transformer.")})
    device = next(transformer.parameters()).device
    ema.shadow_params = [tensors[f"ema.{i}"].to(device) for i in range(len(ema.shadow_params))]
    load_optimizer_tensors(opt, tensors, json.loads(meta["optim"]))
    gen.set_state(tensors["generator_state"])
    ema.optimization_step = int(meta["step"])
    return int(meta["step"])


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# -- training --------------------------------------------------------------------------------------------
def train(run: Path, steps: int = 6000, batch: int = 64, lr: float = 3e-4, seed: int = 0, ckpt_every: int = 250,
          export_every: int = 1000, cfg_dropout: float = 0.1, per_cell: int = 100,
          transformer_config: dict | None = None, device: str | None = None, progress: bool = True,
          warmup: int = WARMUP, on_step=None) -> Path:
    """Train (or resume) the transformer in ``run``; returns the checkpoint path (module docstring).

    ``transformer_config`` overrides :data:`configs.MMDIT_TRANSFORMER` (tests use a tiny one); ``on_step(step,
    loss)`` is called after every optimizer step (the loss of that step's batch)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.training_utils import EMAModel

    from ..pipelines.family import Context
    from ..pipelines.flow import FlowModel, noisy, velocity

    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
    torch.manual_seed(seed)
    data = load_or_build(run / "train.npz", per_cell=per_cell)
    vae = canvas_vae()
    mean, std, shift = encode_latents(run, data, vae)
    scaling = float(vae.config.scaling_factor)
    transformer = SD3Transformer2DModel(**(transformer_config or C.MMDIT_TRANSFORMER))
    pipe = build_pipeline(transformer, shift, vae=vae)
    rows, pooled, empty_rows, empty_pooled = caption_rows(pipe)
    copies, (rows, empty_rows) = collapse_repeated_rows(rows, empty_rows)
    if copies > 1:   # the T5 zero rows, computed once (exactly: RepeatedLastRowAttention)
        transformer.set_attn_processor(RepeatedLastRowAttention(copies))
    flow = FlowModel(pipe)
    from .world import STYLES

    cell = torch.from_numpy(data.objects * len(STYLES) + data.styles)
    transformer.to(dev).train()
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True)
    gen = torch.Generator().manual_seed(seed)
    ckpt = run / "mmdit.ckpt.safetensors"
    start = _load(ckpt, transformer, ema, opt, gen) if ckpt.exists() else 0
    n_t = rows.shape[1]
    bar = tqdm(range(start, steps), desc="canvas-mini-mmdit", initial=start, total=steps, disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        idx = torch.randint(len(data), (batch,), generator=gen)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen) - shift) * scaling
        tmpl = torch.randint(n_t, (batch,), generator=gen)
        emb, pool = rows[cell[idx], tmpl].clone(), pooled[cell[idx], tmpl].clone()
        drop = torch.rand(batch, generator=gen) < cfg_dropout
        emb[drop], pool[drop] = empty_rows, empty_pooled
        eps = torch.randn(z.shape, generator=gen)
        u = torch.sigmoid(LOGIT_MEAN + LOGIT_STD * torch.randn(batch, generator=gen))
        sigma = flow.shifted(u)
        z, eps, sigma = z.to(dev), eps.to(dev), sigma.to(dev)
        pred = flow.predict(transformer, noisy(z, eps, sigma), sigma, Context(emb.to(dev), pool.to(dev)))
        loss = torch.nn.functional.mse_loss(pred, velocity(z, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if on_step is not None:
            on_step(step + 1, loss.item())
        done = step + 1
        if done % ckpt_every == 0 or done == steps:
            _save(ckpt, done, transformer, ema, opt, gen, shift)
        if export_every and (done % export_every == 0 or done == steps):
            export(run, run / "pipeline")
    return ckpt


def load_transformer(run: Path, ema: bool = True):
    """(transformer, checkpoint metadata) of ``run``'s checkpoint: the EMA weights, or the trained ones."""
    from diffusers import SD3Transformer2DModel

    t, meta = load_tensors(Path(run) / "mmdit.ckpt.safetensors")
    transformer = SD3Transformer2DModel(**json.loads(meta["transformer_config"]))
    if ema:
        for i, p in enumerate(transformer.parameters()):
            p.data.copy_(t[f"ema.{i}"])
    else:
        transformer.load_state_dict({k[12:]: v for k, v in t.items() if k.startswith("transformer.")})
    return transformer.eval().requires_grad_(False), meta


@torch.no_grad()
def fixed_batch_loss(run: Path, ema: bool = False, n: int = 32, seed: int = 1234) -> float:
    """The training loss of ``run``'s checkpoint on one fixed batch: ``n`` training latents (posterior means)
    with their first caption, fixed noise and noise levels drawn from ``seed``. A diagnostic of training
    progress that does not depend on the run's own random batches."""
    from ..pipelines.family import Context
    from ..pipelines.flow import FlowModel, noisy, velocity
    from .world import STYLES

    run = Path(run)
    transformer, meta = load_transformer(run, ema)
    pipe = build_pipeline(transformer, float(meta["shift_factor"]))
    data = load_or_build(run / "train.npz", per_cell=1)
    mean, _, shift = encode_latents(run, data, pipe.vae)
    rows, pooled, _, _ = caption_rows(pipe)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=gen)[:n]
    cell = torch.from_numpy(data.objects * len(STYLES) + data.styles)[idx]
    z = (mean[idx] - shift) * pipe.vae.config.scaling_factor
    eps = torch.randn(z.shape, generator=gen)
    flow = FlowModel(pipe)
    sigma = flow.shifted(torch.sigmoid(LOGIT_MEAN + LOGIT_STD * torch.randn(len(idx), generator=gen)))
    pred = flow.predict(transformer, noisy(z, eps, sigma), sigma, Context(rows[cell, 0], pooled[cell, 0]))
    return float(torch.nn.functional.mse_loss(pred, velocity(z, eps)))


def export(run: Path, out: Path) -> Path:
    """Write the ``StableDiffusion3Pipeline`` folder from the EMA weights of ``run``'s checkpoint (atomically:
    a sibling ``.tmp`` folder renamed into place)."""
    from .tokenizer import write_clip_tokenizer

    run, out = Path(run), Path(out)
    transformer, meta = load_transformer(run)
    pipe = build_pipeline(transformer, float(meta["shift_factor"]))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.text_encoder.half(), pipe.text_encoder_2.half()   # their values are float16 already (text_encoders)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # No T5: recorded as [null, null], so DiffusionPipeline.from_pretrained loads it as None (its rows: zeros).
    index = json.loads((tmp / "model_index.json").read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    # The tokenizers as CLIP's vocab.json + merges.txt (1.5 MB each instead of 3.6 MB tokenizer.json).
    for name, pad in (("tokenizer", None), ("tokenizer_2", "!")):
        shutil.rmtree(tmp / name)
        write_clip_tokenizer(tmp / name)
        if pad is not None:
            for f in ("special_tokens_map.json", "tokenizer_config.json"):
                cfg = json.loads((tmp / name / f).read_text())
                cfg["pad_token"] = pad
                (tmp / name / f).write_text(json.dumps(cfg, indent=1))
    write_text_atomic(tmp / "training_step.json", json.dumps({"step": int(meta["step"])}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def time_steps(n: int = 20, batch: int = 64, per_cell: int = 1, run: Path = Path("runs/mmdit-timing"),
               device: str | None = None) -> float:
    """Seconds per training step at the recipe's size (the mean over ``n`` steps after 2 warm-up steps), in a
    scratch ``run`` folder (its checkpoint is removed first, so every call times fresh steps)."""
    marks = []
    (Path(run) / "mmdit.ckpt.safetensors").unlink(missing_ok=True)

    def mark(step, _loss):
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    train(run, steps=n + 2, batch=batch, ckpt_every=10 ** 9, export_every=0, per_cell=per_cell, device=device,
          on_step=mark)
    return (marks[-1] - marks[1]) / n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m erasekit.canvas.train_mmdit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["train", "export", "check", "time"])
    p.add_argument("--run", type=Path, default=Path("runs/canvas-mmdit"), help="run folder (checkpoints, caches)")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--export-every", type=int, default=1000)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seeds", type=int, default=5, help="check: seeds per (object, style) prompt")
    p.add_argument("--guidance", type=float, default=7.5, help="check: classifier-free guidance scale")
    p.add_argument("--out", type=Path, default=None, help="export folder (default: <run>/pipeline)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    out = a.out or a.run / "pipeline"
    if a.stage == "train":
        train(a.run, a.steps, a.batch, a.lr, a.seed, a.ckpt_every, a.export_every, device=a.device)
    elif a.stage == "export":
        export(a.run, out)
        print(f"{out}: {folder_bytes(out) / 1e6:.1f} MB", flush=True)
    elif a.stage == "check":
        from .check import generation_accuracy

        gen = generation_accuracy(str(out), seeds=a.seeds, guidance=a.guidance)
        print(json.dumps({k: v for k, v in gen.items() if k != "per_cell"}, indent=1), flush=True)
        ok = gen["style"] >= TARGET and gen["object"] >= TARGET
        print(f"style {gen['style']:.1%}, object {gen['object']:.1%}: {'meets' if ok else 'misses'} the "
              f"{TARGET:.0%} target", flush=True)
        if not ok:
            raise SystemExit(1)
    else:
        print(f"{time_steps(batch=a.batch, run=a.run / 'timing', device=a.device):.3f} s per step (batch {a.batch}, "
              f"{torch.get_num_threads()} threads)", flush=True)
    print(f"{a.stage}: done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

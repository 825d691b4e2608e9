"""Time and peak memory of one erasure on the full-size SD 3.5-medium and FLUX.1-dev architectures (random weights).

    python benchmarks/bench_mmdit.py                                   # SD 3.5-medium, every method, bf16
    python benchmarks/bench_mmdit.py --family flux --device cuda       # FLUX.1-dev on a GPU
    python benchmarks/bench_mmdit.py --family sd3 --methods uce,esd-x --resolution 512 --steps 2
    python benchmarks/bench_mmdit.py --tiny --family flux              # the script itself, on tiny configs

Each model is built from its published configuration with random weights (the compute and memory of
the trained one, no download), directly in ``--dtype`` on ``--device``:

- **sd3** (SD 3.5-medium): ``SD3Transformer2DModel`` (24 layers, 24 heads x 64, joint_attention_dim 4096,
  caption_projection_dim 1536, pooled_projection_dim 2048, qk_norm rms_norm, dual attention in layers
  0..12, pos_embed_max_size 384, sample_size 128, patch 2, 16 channels), CLIP-L and CLIP-G (OpenCLIP
  bigG) with projections, T5-XXL's encoder, the 16-channel VAE, ``FlowMatchEulerDiscreteScheduler(shift=3)``.
- **flux** (FLUX.1-dev): ``FluxTransformer2DModel`` (19 joint + 38 single-stream blocks, 24 heads x 128,
  joint_attention_dim 4096, pooled_projection_dim 768, guidance embedding), CLIP-L, T5-XXL's encoder,
  the 16-channel VAE, ``FlowMatchEulerDiscreteScheduler(shift=3, dynamic shifting)``.

Tokenizers: CLIP's BPE (open-clip-torch's vocabulary) and a character-level T5 tokenizer built in
memory (token ids fit T5's vocabulary; the sequence length, which sets the cost, is the pipeline's own).

Methods (``--methods``, each run once through ``erasekit.erase`` on the concept ``--concept``; the training
methods with gradient checkpointing and, in half precision, ``mixed_precision`` bf16 / fp16: fp32 master
copies of the trained weights):

- ``uce``: UCE on the context embedder and pooled projection (the exact closed form);
- ``uce-blocks``: UCE on every joint block's ``add_k_proj`` / ``add_v_proj`` with ``record_steps=1``;
- ``esd-x``: ESD, ``param_set="esd-x"``, ``--steps`` optimizer steps;
- ``advunlearn``: one AdvUnlearn iteration (no warm-up, fast-AT inner attack of one step, a retain batch
  of five prompts, a latent pool of one trajectory).

Every sampling inside a method (UCE-blocks' recorded trajectory, ESD's x_t, AdvUnlearn's latent pool)
runs at ``--resolution`` (the pipeline's native size is set to it) with ``--sample-steps`` steps.

Before anything is built, the memory the weights need is estimated from the configurations'
parameter counts (built on the ``meta`` device: no memory) times the dtype's size, plus each method's
own state (trained copies, gradients, Adam moments, UCE-blocks' normal-equation matrices); a method
whose estimate exceeds the available memory (``MemAvailable`` on CPU, free CUDA memory on a GPU) is
not run, and the JSON says why. The estimate leaves out activations, so it is a lower bound.

Each method runs in its own process (``--in-process``: all in this one, quicker, peaks may mix), so
the peaks do not mix. Peak memory is CUDA's ``max_memory_allocated`` on a GPU, the process's peak
resident set size on CPU (it includes the resident model). Writes JSON with the protocol to
``benchmarks/results/mmdit_<family>[_tiny].json`` (``--out`` to change it), again after each method, so
a run stopped midway keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("uce", "uce-blocks", "esd-x", "advunlearn")
RETAIN = ["a photo of a dog", "a photo of a car", "a photo of a tree", "a photo of a cup", "a photo of a bench"]
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}

# The published configurations (SD 3.5-medium, FLUX.1-dev and their text encoders), and tiny ones of the same
# architecture that test the script. Each entry: keyword arguments of the class named by the builder below.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)
VAE16 = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32)
CONFIGS = {
    "sd3": {
        "full": dict(
            transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                             attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                             caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                             qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
            clip=[CLIP_L, CLIP_G], t5=T5_XXL, vae=dict(VAE16, shift_factor=0.0609, scaling_factor=1.5305),
            scheduler=dict(shift=3.0)),
        "tiny": dict(
            transformer=dict(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                             attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                             joint_attention_dim=64, pooled_projection_dim=64, qk_norm="rms_norm",
                             dual_attention_layers=(0,)),
            clip=[dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                       projection_dim=32)] * 2,
            t5=dict(d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
            vae=dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                     shift_factor=0.06, scaling_factor=1.5),
            scheduler=dict(shift=3.0)),
    },
    "flux": {
        "full": dict(
            transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                             guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
            clip=[CLIP_L], t5=T5_XXL, vae=dict(VAE16, shift_factor=0.1159, scaling_factor=0.3611),
            scheduler=dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                           base_image_seq_len=256, max_image_seq_len=4096)),
        "tiny": dict(
            transformer=dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             guidance_embeds=True, axes_dims_rope=(4, 4, 8)),
            clip=[dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                       projection_dim=32)],
            t5=dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
            vae=dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                     shift_factor=0.06, scaling_factor=1.5),
            scheduler=dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                           base_image_seq_len=256, max_image_seq_len=4096)),
    },
}


# -- building ----------------------------------------------------------------------------------------------
def _t5_tokenizer():
    """A character-level T5 tokenizer (Unigram, no sentencepiece file, no hub): ``</s>`` closes a prompt, ``<pad>``
    (id 0) fills the rest, as in T5's own."""
    import string

    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -4.0) for c in chars] + [("\u2581" + c, -3.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_modules(family: str, size: str, vocab: int | None = None) -> dict:
    """The transformer, text encoders and VAE of ``family`` (random weights, seed 0) on the current default device
    and dtype (see :func:`built_in`)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    cfg = CONFIGS[family][size]
    torch.manual_seed(0)
    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    out = {"transformer": cls(**cfg["transformer"]).eval()}
    clip_cls = CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel
    for i, c in enumerate(cfg["clip"]):
        config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                                pad_token_id=49407, **c)
        out["text_encoder" + ("", "_2")[i]] = clip_cls(config).eval()
    t5 = dict(cfg["t5"])
    t5.setdefault("vocab_size", vocab or 32128)
    t5_name = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    out[t5_name] = T5EncoderModel(T5Config(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **t5)).eval()
    n = len(cfg["vae"]["block_out_channels"])
    out["vae"] = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                               up_block_types=("UpDecoderBlock2D",) * n, use_quant_conv=False,
                               use_post_quant_conv=False, **cfg["vae"]).eval()
    return out


class built_in:
    """``with built_in(device, dtype):`` new modules are created on ``device`` in ``dtype`` (no float32 copy of
    a bfloat16 model is ever made: FLUX.1-dev in float32 alone would take 48 GB)."""

    def __init__(self, device: str, dtype: str):
        import torch

        self.device, self.dtype = torch.device(device), getattr(torch, dtype)

    def __enter__(self):
        import torch

        self.old = torch.get_default_dtype()
        self.device.__enter__()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        import torch

        torch.set_default_dtype(self.old)
        self.device.__exit__(*exc)


def build_pipeline(family: str, size: str, device: str, dtype: str, resolution: int | None):
    """The diffusers pipeline of ``family`` built from :data:`CONFIGS` with random weights."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    from erasekit.canvas.tokenizer import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as folder:   # the tokenizers read their files once, here
        clip_dir = write_clip_tokenizer(Path(folder))
        clip_l = CLIPTokenizer.from_pretrained(clip_dir)
        clip_g = CLIPTokenizer.from_pretrained(clip_dir, pad_token="!")   # OpenCLIP-G (SD 3) pads with "!"
    t5_tok = _t5_tokenizer()
    with built_in(device, dtype):
        m = build_modules(family, size, vocab=None if size == "full" else len(t5_tok))
    for module in m.values():   # tables computed in float32 at init (SD 3's positional embedding) to ``dtype``
        torch.nn.Module.to(module, dtype=getattr(torch, dtype))
    scheduler = FlowMatchEulerDiscreteScheduler(**CONFIGS[family][size]["scheduler"])
    if family == "sd3":
        pipe = StableDiffusion3Pipeline(scheduler=scheduler, tokenizer=clip_l, tokenizer_2=clip_g, tokenizer_3=t5_tok,
                                        **m)
    else:
        pipe = FluxPipeline(scheduler=scheduler, tokenizer=clip_l, tokenizer_2=t5_tok, **m)
    if resolution is not None:   # every sampling inside a method runs at the pipeline's native size
        pipe.default_sample_size = resolution // pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    return pipe   # already on ``device`` in ``dtype`` (built there)


# -- the memory estimate -----------------------------------------------------------------------------------
def parameter_counts(family: str, size: str) -> dict:
    """Values (parameters and buffers) of each module, and the size of each method's trained or solved set,
    counted on the ``meta`` device."""
    import torch

    with built_in("meta", "float32"):
        m = build_modules(family, size)
    # buffers too: SD 3's positional-embedding table (pos_embed_max_size 384: 0.23 B values) is one
    counts = {name: sum(t.numel() for t in (*mod.parameters(), *mod.buffers())) for name, mod in m.items()}
    tr = m["transformer"]
    text_side = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    counts["esd-x trained"] = sum(p.numel() for n, p in tr.named_parameters()
                                  if n.rsplit(".", 1)[0].endswith(text_side))
    counts["clip encoders"] = sum(counts[n] for n in m if n.startswith("text_encoder")
                                  and not isinstance(m[n], _t5_class()))
    blocks = [mod for n, mod in tr.named_modules()
              if n.endswith("attn.add_k_proj") and isinstance(mod, torch.nn.Linear)]
    counts["uce-blocks normal equations"] = sum(2 * b.in_features ** 2 for b in blocks)
    return counts


def _t5_class():
    from transformers import T5EncoderModel

    return T5EncoderModel


def estimate_bytes(counts: dict, dtype: str) -> dict:
    """Bytes each method needs at least: the weights in ``dtype`` plus its own state (activations not counted)."""
    weights = sum(v for k, v in counts.items() if k in ("transformer", "vae") or k.startswith("text_encoder"))
    base = weights * DTYPES[dtype]
    # each trained parameter: float32 gradient and two Adam moments (12 bytes), the original kept (dtype), and in
    # half precision a float32 master copy (4 bytes)
    per = 12 + DTYPES[dtype] + (4 if dtype != "float32" else 0)
    train = lambda n: n * per  # noqa: E731
    return {"weights": base, "uce": base, "uce-blocks": base + 8 * counts["uce-blocks normal equations"],
            "esd-x": base + train(counts["esd-x trained"]), "advunlearn": base + train(counts["clip encoders"])}


def available_bytes(device: str) -> int:
    """Free memory where the model goes: CUDA's free memory, else ``MemAvailable``."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# -- one method --------------------------------------------------------------------------------------------
def method_options(method: str, args) -> tuple[str, dict]:
    """(registered method, options) of one benchmarked erasure."""
    # half-precision weights train through fp32 master copies (the engine refuses them with mixed_precision="no")
    mixed = {"bfloat16": "bf16", "float16": "fp16"}.get(args.dtype, "no")
    train = dict(progress=False, checkpoint_dir=None, seed=0, gradient_checkpointing=not args.tiny,
                 mixed_precision=mixed)
    if method == "uce":
        return "uce", {}
    if method == "uce-blocks":
        return "uce", dict(mmdit_maps="blocks", record_steps=1)
    if method == "esd-x":
        return "esd", dict(train, param_set="esd-x", steps=args.steps, ddim_steps=args.sample_steps)
    if method == "advunlearn":
        return "advunlearn", dict(train, steps=1, warmup=0, attack="fast_at", attack_steps=1, retain=RETAIN,
                                  retain_batch=len(RETAIN), pool_size=1, ddim_steps=args.sample_steps)
    raise SystemExit(f"unknown method {method!r}: choose from {', '.join(METHODS)}")


def run_method(method: str, args) -> dict:
    """Build the pipeline, run one erasure under ``erasekit._profile.measure``; the record of the run."""
    import torch

    import erasekit
    from erasekit._profile import _rss_bytes, measure

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = build_pipeline(args.family, "tiny" if args.tiny else "full", args.device, args.dtype, args.resolution)
    build_s = time.perf_counter() - t0
    name, options = method_options(method, args)
    before = _rss_bytes()
    with measure(args.device) as usage:
        edit = erasekit.erase(pipe, name, [args.concept], **options)
    side = pipe.default_sample_size * pipe.vae_scale_factor
    return {"method": method, "erasekit_method": name, "options": {k: v for k, v in options.items()},
            "wall_time_s": round(usage.wall_time_s, 3), "peak_memory_bytes": usage.peak_memory_bytes,
            "memory_kind": usage.memory_kind, "rss_before_bytes": before, "build_s": round(build_s, 1),
            "resolution": side, "edit_tensors": len(edit.keys), "edit_bytes": edit.nbytes(),
            "trained_or_edited": sorted({k.split("/", 1)[0] for k in edit.keys}),
            "manifest_peak_memory_bytes": edit.manifest.get("peak_memory_bytes")}


def _in_process(method: str, args) -> dict:
    """Run one method in this process; a failure is recorded, not raised."""
    import traceback

    try:
        return run_method(method, args)
    except Exception as e:  # noqa: BLE001 - the other methods still run, and the JSON says what failed
        return {"method": method, "failed": "".join(traceback.format_exception(e))[-3000:]}


def _child(method: str, args) -> dict:
    """Run one method in a fresh process (its peak memory its own); a failure is recorded, not raised."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, __file__, *args.argv, "--child", method, "--child-out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    try:
        if res.returncode != 0:
            return {"method": method, "failed": res.stderr[-3000:], "returncode": res.returncode}
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("sd3", "flux"), default="sd3", help="sd3 (SD 3.5-medium) or flux (FLUX.1-dev)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                    help="default bfloat16 where the device supports it, else float32")
    ap.add_argument("--resolution", type=int, default=None,
                    help="image side of every sampling (default: native, 1024; --tiny: 32)")
    ap.add_argument("--steps", type=int, default=2, help="ESD-x optimizer steps (default 2)")
    ap.add_argument("--sample-steps", type=int, default=4,
                    help="steps of the sampled x_t schedule (ESD-x) and of AdvUnlearn's latent pool (default 4)")
    ap.add_argument("--concept", default="Van Gogh")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true",
                    help="tiny configurations of the same architectures (tests the script)")
    ap.add_argument("--in-process", action="store_true", help="run every method in this process (peaks may mix)")
    ap.add_argument("--out", default=None, help="the JSON to write (default benchmarks/results/mmdit_<family>.json)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    import torch

    cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda else "cpu")
    if args.dtype is None:
        bf16 = torch.cuda.is_bf16_supported() if args.device.startswith("cuda") else \
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
        args.dtype = "bfloat16" if bf16 else "float32"
    if args.tiny and args.resolution is None:   # Flux's native size is 1024 / 8 latents whatever the VAE
        args.resolution = 32
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.child:
        Path(args.child_out).write_text(json.dumps(run_method(args.child, args)))
        return {}
    size = "tiny" if args.tiny else "full"
    counts = parameter_counts(args.family, size)
    need, free = estimate_bytes(counts, args.dtype), available_bytes(args.device)
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    results = {}
    path = Path(args.out) if args.out else \
        ROOT / "benchmarks" / "results" / f"mmdit_{args.family}{'_tiny' if args.tiny else ''}.json"
    for method in args.methods:
        if need[method] > free:
            results[method] = {"method": method, "not_run": (
                f"needs at least {gib(need[method])} ({args.family} weights {gib(need['weights'])} in {args.dtype} "
                f"plus the method's state, activations not counted) but {gib(free)} is available on {args.device}: "
                "run it on a machine (or GPU: --device cuda) with more memory")}
            print(f"{method}: NOT RUN: {results[method]['not_run']}", flush=True)
            continue
        print(f"{method}: running ({args.family} {size}, {args.dtype} on {args.device}) ...", flush=True)
        results[method] = _in_process(method, args) if args.in_process else _child(method, args)
        shown = {k: v for k, v in results[method].items() if k in ("wall_time_s", "peak_memory_bytes")}
        if "failed" in results[method]:
            shown["failed"] = results[method]["failed"].strip().splitlines()[-1]
        print(f"{method}: {shown}", flush=True)
        _write(path, args, size, counts, need, free, results)   # after every method: a killed run keeps its results
    print("->", path)
    return _write(path, args, size, counts, need, free, results)


def _write(path: Path, args, size: str, counts: dict, need: dict, free: int, results: dict) -> dict:
    """Write the report (protocol, parameter counts, estimates, the results so far) atomically; return it."""
    import torch

    from erasekit._io import write_text_atomic

    report = {"protocol": {"family": args.family, "architecture": size, "configs": CONFIGS[args.family][size],
                           "dtype": args.dtype, "device": args.device, "resolution": args.resolution or "native",
                           "steps": args.steps, "sample_steps": args.sample_steps, "concept": args.concept,
                           "threads": args.threads, "weights": "random (seed 0), built from config",
                           "processes": "this one" if args.in_process else "one per method",
                           "peak_memory": "CUDA max_memory_allocated" if args.device.startswith("cuda")
                           else "peak resident set size of the process (includes the resident model)"},
              "parameters": counts, "estimated_bytes": need, "available_bytes": free,
              "environment": {"platform": platform.platform(), "python": platform.python_version(),
                              "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
              "results": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()

"""Fault injection: crafted bad Edit files and bad command lines.

Every bad Edit is refused by ``Edit.load(path, pipe)`` with an :class:`EditError` that names the
problem, leaving the pipeline's weights bitwise unchanged, and by ``erasekit attack`` / ``eval``
with exit code 2 and one line on stderr, before any model is sampled. Bad command-line values are
refused the same way. A few cases also run through a real subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import erasekit.erase.uce  # noqa: F401  (registers "uce", which declares that it changes only the UNet)
from erasekit.cli.main import EXIT_OK, EXIT_USAGE, main
from erasekit.errors import EditError
from erasekit.pipelines import Edit
from erasekit.pipelines.edit import FORMAT, BaseCheckSkippedWarning

BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
K, V = f"unet/{BLOCK}.attn2.to_k.weight", f"unet/{BLOCK}.attn2.to_v.weight"
U_, V_ = "#delta_u", "#delta_v"


@dataclass
class World:
    root: Path
    model: Path                 # the tiny sd1 pipeline on disk (what the CLI loads)
    pipe: object                # the same pipeline in memory (what the API checks run on)
    tensors: dict               # a valid Edit's tensors, as stored in its file
    manifest: dict              # and its manifest
    other_model: Path           # a valid Edit of another sd1 model (other weights)
    other_family: Path          # a valid Edit of a tiny sd2 model


def _new_weights(pipe, seed: int) -> dict:
    """A dense change of to_k and a rank-1 change of to_v: stored as one weight and one delta."""
    g = torch.Generator().manual_seed(seed)
    k, v = (pipe.unet.get_parameter(key[5:]).detach() for key in (K, V))
    return {K: k + 0.1 * torch.randn(k.shape, generator=g),
            V: v + torch.outer(torch.randn(v.shape[0], generator=g), torch.randn(v.shape[1], generator=g))}


def _edit(pipe, seed: int = 0) -> Edit:
    edit = Edit.from_weights(pipe, _new_weights(pipe, seed), {"method": "uce", "concepts": ["Van_Gogh"]})
    assert set(edit.weights) == {K} and set(edit.deltas) == {V}
    return edit


@pytest.fixture(scope="module")
def world(tmp_path_factory, clip_tokenizer_dir) -> World:
    from conftest import build_tiny

    root = tmp_path_factory.mktemp("faults")
    pipe = build_tiny("sd1", clip_tokenizer_dir)
    pipe.save_pretrained(root / "model")
    good = _edit(pipe).save(root / "good.safetensors")
    with open(good, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    from safetensors.torch import load_file

    other = build_tiny("sd1", clip_tokenizer_dir)
    with torch.no_grad():
        for p in other.unet.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return World(root, root / "model", pipe, load_file(str(good)), json.loads(header["__metadata__"]["manifest"]),
                 _edit(other, 1).save(root / "other-model.safetensors"),
                 _edit(build_tiny("sd2", clip_tokenizer_dir), 2).save(root / "other-family.safetensors"))


def _write(path: Path, tensors: dict, manifest, fmt: str | None = FORMAT) -> Path:
    meta = {} if fmt is None else {"format": fmt}
    if manifest is not None:
        meta["manifest"] = manifest if isinstance(manifest, str) else json.dumps(manifest)
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path), metadata=meta)
    return path


def _variant(tensors=None, manifest=None, drop=(), **fields):
    """A builder of the valid Edit changed by ``tensors(t)`` / ``manifest(m)`` / ``drop`` / ``fields``."""

    def build(w: World, path: Path) -> Path:
        t = {k: v.clone() for k, v in w.tensors.items()}
        m = json.loads(json.dumps(w.manifest))
        if tensors is not None:
            t = tensors(t) or t
        for name in drop:
            m.pop(name)
        m.update(fields)
        if manifest is not None:
            m = manifest(m)
        return _write(path, t, m)

    return build


def _renamed(old: str, new: str):
    """The valid Edit with tensor ``old`` renamed ``new`` everywhere (tensors, keys, fingerprint)."""

    def manifest(m):
        m["keys"] = sorted(new if k == old else k for k in m["keys"])
        m["fingerprint"]["stats"][new] = m["fingerprint"]["stats"].pop(old)
        return m

    return _variant(tensors=lambda t: {(new + k[len(old):] if k.startswith(old) else k): v for k, v in t.items()},
                    manifest=manifest)


def _set(key: str, value):
    """Set tensor ``key`` to ``value``, or to ``value(old)`` if callable."""

    def change(t):
        t[key] = value(t[key]) if callable(value) else value
    return change


def _drop(t: dict, key: str) -> dict:
    del t[key]
    return t


def _nan(x):
    x = x.clone()
    x.view(-1)[3] = float("nan")
    return x


def _inf(x):
    x = x.clone()
    x.view(-1)[0] = float("inf")
    return x


def _raw(data: bytes):
    def build(w, path):
        path.write_bytes(data)
        return path
    return build


def _truncated(w, path):
    data = (w.root / "good.safetensors").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _folder(w, path):
    path.mkdir()
    return path


TE_KEY = "text_encoder/text_model.encoder.layers.0.self_attn.k_proj.weight"
# (id, builder, what the one-line error must say); builders write the bad file at the path they get
EDIT_CASES = [
    ("not-a-file", lambda w, p: p, "no Edit file at"),
    ("a-folder", _folder, "is a folder, not an Edit file"),
    ("empty-file", _raw(b""), "is empty"),
    ("truncated", _truncated, "truncated or corrupt"),
    ("not-safetensors", _raw(b"this is a text file, not safetensors\n" * 4), "not a readable Edit file"),
    ("random-bytes", _raw(bytes(range(256)) * 8), "not a readable Edit file"),
    ("no-manifest", lambda w, p: _write(p, w.tensors, None, fmt=None), "not an erasekit Edit"),
    ("other-format", lambda w, p: _write(p, w.tensors, w.manifest, fmt="erasekit.edit/99"), "not an erasekit Edit"),
    ("manifest-not-json", lambda w, p: _write(p, w.tensors, "{'method': uce"), "manifest is not valid JSON"),
    ("manifest-a-list", lambda w, p: _write(p, w.tensors, "[1, 2, 3]"), "manifest is a JSON list"),
    ("concepts-a-number", _variant(concepts=3), "'concepts' must be a list"),
    ("keys-not-a-list", _variant(keys=K), "'keys' must be a non-empty list"),
    ("no-keys", _variant(drop=("keys",)), "has no 'keys'"),
    ("method-a-number", _variant(method=7), "'method' must be"),
    ("base-model-a-list", _variant(base_model=["a"]), "'base_model' must be"),
    ("fingerprint-malformed", _variant(manifest=lambda m: {**m, "fingerprint": {"id": "x", "stats": {K: ["a"]}}}),
     "'fingerprint' must be"),
    ("key-without-slash", _renamed(K, K.replace("/", ".")), "is not '<component>/<parameter name>'"),
    ("key-for-vae", _renamed(K, "vae/decoder.conv_in.weight"), "never 'vae'"),
    ("key-for-unknown-component", _renamed(K, "safety_checker/" + K[5:]), "never 'safety_checker'"),
    ("key-outside-method-components", _renamed(K, TE_KEY), "'uce', which changes only unet"),
    ("unknown-parameter", _renamed(K, f"unet/{BLOCK}.attn2.to_z.weight"), "has no parameter"),
    ("wrong-shape-weight", _variant(tensors=_set(K, torch.zeros(3, 3))), "Edit has shape (3, 3)"),
    ("wrong-inner-dim-delta", _variant(tensors=_set(V + V_, lambda v: torch.cat([v, v]))), "do not multiply"),
    ("delta-not-2d", _variant(tensors=_set(V + U_, lambda u: u[:, 0])), "do not multiply"),
    ("integer-weight", _variant(tensors=_set(K, lambda k: k.long())), "dtype int64"),
    ("bool-delta", _variant(tensors=_set(V + U_, lambda u: u > 0)), "dtype bool"),
    ("nan-weight", _variant(tensors=_set(K, _nan)), "contains NaN or Inf"),
    ("inf-delta-factor", _variant(tensors=_set(V + V_, _inf)), "contains NaN or Inf"),
    ("half-delta", _variant(tensors=lambda t: _drop(t, V + V_)), "has only its U factor"),
    ("weight-and-delta", _variant(tensors=_set(V, torch.zeros(16, 32))), "both as a weight and"),
    ("missing-tensor", _variant(tensors=lambda t: _drop(t, K)), "missing 1 tensor"),
    ("unknown-extra-tensor", _variant(tensors=_set(f"unet/{BLOCK}.attn2.to_q.weight", torch.zeros(8, 8))),
     "does not list"),
    ("fingerprint-removed", _variant(drop=("fingerprint",)), "has no 'fingerprint'"),
    ("family-removed", _variant(drop=("family",)), "has no 'family'"),
    ("family-unknown", _variant(family="sd9"), "'family' must be one of sd1, sd2, sdxl"),
    ("family-says-sd2", _variant(family="sd2"), "made for an sd2 model and this pipeline is sd1"),
    ("fingerprint-of-another-model", lambda w, p: w.other_model, "different base model"),
    ("edit-of-another-family", lambda w, p: w.other_family, "made for an sd2 model and this pipeline is sd1"),
    ("fingerprint-tampered", _variant(manifest=lambda m: {**m, "fingerprint": {
        "id": "0" * 16, "stats": {k: [x + 1.0 for x in v] for k, v in m["fingerprint"]["stats"].items()}}}),
     "different base model"),
    ("one-step-without-timestep", _variant(sampler="one_step"), "has no 'generator_timestep'"),
    ("one-step-timestep-a-string", _variant(sampler="one_step", generator_timestep="625"),
     "'generator_timestep' must be"),
    ("one-step-timestep-out-of-schedule", _variant(sampler="one_step", generator_timestep=5000),
     "outside this pipeline's schedule"),
    ("unknown-sampler", _variant(sampler="two_step"), "'sampler' must be"),
    ("wall-time-a-string", _variant(wall_time_s="fast"), "'wall_time_s' must be"),
]


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}/{k}": v.clone() for c in ("unet", "text_encoder", "vae")
            for k, v in getattr(pipe, c).state_dict().items()}


def _unchanged(before, pipe) -> bool:
    after = _weights(pipe)
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def assert_one_line(err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("erasekit: error: ") and "Traceback" not in err, err
    assert needle in lines[0], (needle, err)


def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _attack_argv(w: World, path, tmp_path) -> list[str]:
    return ["-q", "attack", "--edit", str(path), "--model", str(w.model), "--prompt", "a cat",
            "--concept", "Van_Gogh", "--attack", "none", "--out", str(tmp_path / "attack")]


@pytest.mark.parametrize("build,needle", [c[1:] for c in EDIT_CASES], ids=[c[0] for c in EDIT_CASES])
def test_bad_edit_is_refused_and_the_pipeline_unchanged(world, tmp_path, capsys, build, needle):
    path = build(world, tmp_path / "bad.safetensors")
    before = _weights(world.pipe)
    with pytest.raises(EditError) as info:
        edit = Edit.load(path, world.pipe)
        edit.apply(world.pipe)   # not reached: load refuses; were it reached, apply must refuse too
    assert needle in str(info.value)
    assert _unchanged(before, world.pipe)
    code, out, err = _cli(capsys, *_attack_argv(world, path, tmp_path))
    assert (code, out) == (EXIT_USAGE, "")
    assert_one_line(err, needle)


@pytest.mark.parametrize("case", ["nan-weight", "manifest-a-list", "fingerprint-of-another-model", "key-for-vae"])
def test_eval_refuses_bad_edits_too(world, tmp_path, capsys, case):
    build, needle = next(c[1:] for c in EDIT_CASES if c[0] == case)
    path = build(world, tmp_path / "bad.safetensors")
    code, out, err = _cli(capsys, "-q", "eval", "--edit", str(path), "--model", str(world.model),
                          "--out", str(tmp_path / "report"))
    assert (code, out) == (EXIT_USAGE, "")
    assert_one_line(err, needle)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("case", ["nan-weight", "manifest-a-list"])
def test_bad_edit_through_a_real_process(world, tmp_path, case):
    build, needle = next(c[1:] for c in EDIT_CASES if c[0] == case)
    path = build(world, tmp_path / "bad.safetensors")
    proc = subprocess.run([sys.executable, "-m", "erasekit.cli.main", *_attack_argv(world, path, tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout) == (EXIT_USAGE, "")
    assert_one_line(proc.stderr, needle)


CLI_CASES = [
    (["erase", "--method", "nope", "--concept", "x"], "unknown method 'nope'"),
    (["erase", "--method", "esd", "--concept", "x", "-o", "ddim_steps=-1"], "`ddim_steps` must be >= 1"),
    (["erase", "--method", "esd", "--concept", "x", "-o", 'prompts=["x",'], "option `prompts` must be a list"),
    (["erase", "--method", "uce", "--concept", "x", "-o", "lamb=-1"], "`lamb` must be >= 0"),
    (["erase", "--method", "uce", "--concept", "x", "--model", "/nonexistent/model"], "unknown model"),
    (["erase", "--method", "uce", "--concept", "x", "--model", "{root}"], "not a diffusers pipeline directory"),
    (["erase", "--method", "uce", "--concept", "x", "--model", "{model}", "--dtype", "float99"], "float99"),
    (["attack", "--edit", "{good}", "--model", "{model}", "--prompt", "p", "--concept", "Van_Gogh",
      "--attack", "seed_search", "-o", "rounds=-3"], "`rounds` must be >= 1"),
    (["attack", "--edit", "{good}", "--model", "{model}", "--prompt", "p", "--concept", "Van_Gogh",
      "--attack", "zap"], "unknown attack method 'zap'"),
    (["attack", "--edit", "{good}", "--model", "{model}", "--prompt", "p", "--seed", "one"], "invalid int value"),
    (["attack", "--edit", "{good}", "--model", "/nonexistent/model", "--prompt", "p", "--concept", "Van_Gogh",
      "--attack", "none"], "unknown model"),
    (["eval", "--edit", "{good}", "--model", "{model}", "--judge", "no-such-judge"], "--judge must be"),
    (["attack", "--concept", "Van_Gogh", "--prompts-file", "{binary}", "--attack", "none"], "cannot be read as UTF-8"),
    (["erase", "--method", "uce", "--concept", "x", "--model", "{model}", "--device", "cuda:7"],
     "is not on this machine"),
    (["erase", "--method", "uce", "--concept", "x", "--model", "{model}", "--device", "tpu"], "--device must be"),
    (["erase", "--method", "uce", "--concept", "x", "--model", "{model}", "-o", "erase_scale=inf"], "'inf'"),
    (["erase", "--method", "uce", "--concept", "x", "--model", "{model}", "-o", "preserve_scale=nan"], "'nan'"),
]


@pytest.mark.parametrize("argv,needle", CLI_CASES, ids=[" ".join(a[:2] + a[-2:]) for a, _ in CLI_CASES])
def test_bad_command_line_exits_2_with_one_line(world, tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)   # default output paths land here
    binary = world.root / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    fill = {"good": world.root / "good.safetensors", "model": world.model, "root": world.root, "binary": binary}
    code, out, err = _cli(capsys, "-q", *[a.format(**fill) for a in argv])
    assert (code, out) == (EXIT_USAGE, "")
    assert_one_line(err, needle)
    assert list(tmp_path.iterdir()) == []   # nothing written


def test_finite_check_before_apply(world, tiny_sd1):
    """Checked again when applied: tensors made NaN after loading, or a float16 pipeline that overflows."""
    edit = Edit.load(world.root / "good.safetensors", world.pipe)
    edit.weights[K] = _nan(edit.weights[K])
    before = _weights(world.pipe)
    with pytest.raises(EditError, match="NaN or Inf"):
        edit.apply(world.pipe)
    assert _unchanged(before, world.pipe)
    edit = Edit.load(world.root / "good.safetensors", world.pipe)
    u, v = edit.deltas[V]
    edit.deltas[V] = (u * 3e3, v * 3e3)          # finite in float32, beyond float16's 65504
    half = tiny_sd1.to(torch.float16)
    before = _weights(half)
    with pytest.raises(EditError, match="overflow"):
        edit.apply(half)
    assert _unchanged(before, half)


def test_unsafe_skip_base_check_is_explicit_loud_and_narrow(world, tmp_path, capsys):
    """The opt-out accepts an Edit of another model (with a warning), and nothing else."""
    before = _weights(world.pipe)
    with pytest.warns(BaseCheckSkippedWarning, match="UNSAFE"):
        edit = Edit.load(world.other_model, world.pipe, unsafe_skip_base_check=True)
    with pytest.warns(BaseCheckSkippedWarning):
        with edit.applied(world.pipe):
            assert not _unchanged(before, world.pipe)
    assert _unchanged(before, world.pipe)
    no_family = _variant(drop=("family", "fingerprint"))(world, tmp_path / "anon.safetensors")
    with pytest.warns(BaseCheckSkippedWarning):
        Edit.load(no_family, world.pipe, unsafe_skip_base_check=True)
    for case in ("nan-weight", "key-for-vae", "integer-weight", "missing-tensor", "wrong-shape-weight",
                 "unknown-parameter"):
        build, needle = next(c[1:] for c in EDIT_CASES if c[0] == case)
        path = build(world, tmp_path / f"{case}.safetensors")
        with pytest.raises(EditError) as info, warnings.catch_warnings():
            warnings.simplefilter("ignore", BaseCheckSkippedWarning)
            Edit.load(path, world.pipe, unsafe_skip_base_check=True).apply(world.pipe)
        assert needle in str(info.value)
        assert _unchanged(before, world.pipe)
    argv = _attack_argv(world, world.other_model, tmp_path)
    code, _, err = _cli(capsys, *argv)
    assert code == EXIT_USAGE and "different base model" in err and "--unsafe-skip-base-check" in err
    code, _, err = _cli(capsys, *argv, "--unsafe-skip-base-check")
    assert code == EXIT_OK, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("erasekit: warning: UNSAFE"), err

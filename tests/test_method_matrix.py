"""Every registered method through the same checks, on the tiny sd1, sd2, sdxl, sd3 and flux pipelines.

The matrix is built from :func:`erasekit.erase.registry.methods` (as diffusers' tester mixins and
peft's common tests run every model or tuner through one set of checks), so a method gets these
checks by registering. For each (method, family):

- ``erase`` leaves the pipeline as it found it (weights, buffers, ``requires_grad``, train/eval
  mode), and the Edit holds only parameters of the components the method declares;
- applying the Edit changes only the Edit's own keys, and ``remove`` restores them bitwise;
- ``save`` / ``Edit.load`` round-trip every tensor and the manifest exactly;
- the Edit applied to a half-precision copy of the pipeline gives finite images;
- the manifest records method, concepts, kind, the preset (provider, name, resolved values), the
  options given, the base fingerprint, family and erasekit version;
- a bad option is a :class:`ConfigError` naming it, with the pipeline unchanged.

Each method runs once per family (cached for the module) with the cheap options in ``TINY``; a
method not listed there runs with its defaults. A family a method does not support (``register(...,
families=)``) must be refused with a :class:`ConfigError` that names it, before anything runs.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import erasekit
from erasekit.erase import registry
from erasekit.errors import ConfigError, EditError
from erasekit.pipelines import Edit, default_sampling, generate
from erasekit.pipelines.mmdit import denoiser

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
CONCEPTS = ["Van Gogh"]
RETAIN = ["a photo of a cat", "a photo of a dog", "a photo of a tree"]

# Per-method options that make one run take well under a second on a tiny pipeline.
TINY: dict[str, dict] = {
    "uce": {},
    "rece": {"epochs": 1},
    "esd": {"steps": 2, "ddim_steps": 4, "progress": False},
    "salun": {"pseudo": "a dog", "retain_prompts": RETAIN[:2], "steps": 2, "images_per_prompt": 1,
              "retain_images_per_prompt": 1, "data_steps": 2, "batch_size": 2, "progress": False},
    "advunlearn": {"steps": 2, "warmup": 1, "attack_steps": 1, "retain": RETAIN, "retain_batch": 1,
                   "pool_size": 1, "ddim_steps": 2, "prompts": "concept", "progress": False},
    "sfd": {"iterations": 1, "distill_iterations": 0, "batch_size": 1, "forget_batch_size": 1,
            "retain_prompts": ("a photo of a dog",), "progress": False},
    "fmn": {"steps": 2, "images_per_prompt": 1, "batch_size": 1, "data_steps": 2, "progress": False},
    "ca": {"anchor": "dog", "steps": 2, "images_per_prompt": 1, "batch_size": 2, "data_steps": 2,
           "progress": False},
    "sld": {"preset": "max"},
    "safree": {"self_validation": False},
    "mace": {"steps": 2, "images_per_concept": 1, "sample_steps": 2, "mask_source": "attention", "progress": False},
    "spm": {"steps": 2, "ddim_steps": 3, "anchors": 2, "progress": False},
}
# Per-method invalid values (field -> value); every method is also given an unknown option, an
# unknown preset and an unknown parameter set when its config has those fields.
BAD: dict[str, dict] = {
    "uce": {"erase_scale": -1.0},
    "rece": {"ridge": -1.0},
    "esd": {"eta": -1.0},
    "salun": {"mask_ratio": 1.5},
    "mace": {"mask_source": "sam"},
    "spm": {"layers": "all"},
    "advunlearn": {"k": 0},
    "sfd": {"lr_theta": 0.0},
    "fmn": {"batch_size": 0},
    "ca": {"loss": "score"},
    "sld": {"momentum_beta": 1.0},
    "safree": {"alpha": -2.0},
}
MANIFEST_KEYS = ("method", "concepts", "kind", "preset", "config", "fingerprint", "family", "erasekit_version")
KINDS = ("style", "object", "nudity", "other")
METHODS = sorted(registry.methods())
CASES = [pytest.param(m, f, id=f"{m}-{f}") for m in METHODS for f in FAMILIES]


# -- the pipelines and the runs, once per module ----------------------------------------------------
def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def _snapshot(pipe) -> dict:
    """Everything erase must leave alone: every tensor of every module, grad flags and modes."""
    state = {}
    for name, module in _modules(pipe).items():
        state.update({f"{name}/{k}": v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()})
        state.update({f"{name}/{k}#requires_grad": p.requires_grad for k, p in module.named_parameters()})
        state.update({f"{name}/{k}#training": m.training for k, m in module.named_modules()})
    state["scheduler#config"] = dict(pipe.scheduler.config)
    return state


def _differences(before: dict, pipe) -> list[str]:
    now = _snapshot(pipe)
    if now.keys() != before.keys():
        return sorted(set(now) ^ set(before))
    return [k for k, v in before.items()
            if not (torch.equal(v, now[k]) and v.dtype == now[k].dtype if torch.is_tensor(v) else v == now[k])]


def _declared_components(method: str) -> tuple[str, ...]:
    """The pipeline components the method declared when it registered (``register(..., components=)``)."""
    from erasekit.pipelines.edit import declared_components

    registry.get_method(method)   # imports the method's module, which registers it
    declared = declared_components(method)
    assert declared, f"{method} declares no components: register it with components=(...)"
    return declared


class _Matrix:
    """Lazily built tiny pipelines (one per family) and one Edit (or refusal) per (method, family)."""

    def __init__(self, tokenizer_dir):
        self.tokenizer_dir, self.pipes, self.runs = tokenizer_dir, {}, {}

    def pipe(self, family: str):
        from conftest import build_tiny, build_tiny_mmdit

        if family not in self.pipes:
            build = build_tiny_mmdit if family in ("sd3", "flux") else build_tiny
            pipe = build(family, self.tokenizer_dir)
            self.pipes[family] = (pipe, _snapshot(pipe))
        return self.pipes[family]

    def run(self, method: str, family: str):
        """(pipe, snapshot before, Edit or the ConfigError that refused this family, differences after)."""
        if (method, family) not in self.runs:
            pipe, before = self.pipe(family)
            try:
                result = erasekit.erase(pipe, method, CONCEPTS, **TINY.get(method, {}))
            except ConfigError as e:
                result = e
            self.runs[method, family] = (result, _differences(before, pipe))
        return (self.pipe(family), *self.runs[method, family])


@pytest.fixture(scope="module")
def matrix(clip_tokenizer_dir):
    return _Matrix(clip_tokenizer_dir)


def _edit(matrix, method, family):
    """The case's pipeline, snapshot and Edit; skips a family the method refuses (checked elsewhere)."""
    (pipe, before), result, _ = matrix.run(method, family)
    if isinstance(result, ConfigError):
        pytest.skip(f"{method} refuses {family} (see test_erase_touches_only_declared_parameters): {result}")
    assert not _differences(before, pipe), "an earlier check left the pipeline changed"
    return pipe, before, result


# -- the checks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, family", CASES)
def test_erase_touches_only_declared_parameters(matrix, method, family):
    (pipe, before), result, changed = matrix.run(method, family)
    assert not changed, f"erase left the pipeline changed: {changed[:5]}"
    if isinstance(result, ConfigError):   # a family the method does not support: a clear refusal
        named = family in str(result).lower()
        assert named, f"{method} failed on {family} with a ConfigError that does not name the family: {result}"
        return
    if result.inference_time:   # SLD, SAFREE: no weights, a registered way of sampling
        assert not result.keys and result.manifest["keys"] == [] and result.nbytes() == 0
        return
    declared = [c for c in _declared_components(method) if getattr(pipe, c, None) is not None]
    allowed = {f"{c}/{n}" for c in declared for n, _ in getattr(pipe, c).named_parameters()}
    assert result.keys, "the Edit changes nothing"
    assert set(result.keys) <= allowed, sorted(set(result.keys) - allowed)[:5]
    assert result.manifest["keys"] == result.keys


@pytest.mark.parametrize("method, family", CASES)
def test_apply_changes_only_the_edit_keys_and_remove_restores_bitwise(matrix, method, family):
    pipe, before, edit = _edit(matrix, method, family)
    if edit.one_step:   # a one-step generator is refused by apply and sampled through its own pipeline
        with pytest.raises(EditError, match="one-step"):
            edit.apply(pipe)
        with edit.sampled(pipe) as sampler:
            assert sampler is not pipe
        assert not _differences(before, pipe)
        return
    if edit.inference_time:   # nothing to apply: sampled hooks the pipeline for the block, then unhooks it
        with pytest.raises(EditError, match="sampled"):
            edit.apply(pipe)
        net = denoiser(pipe)   # the UNet, or the SD 3 / Flux transformer
        hooks = (dict(net._forward_pre_hooks), dict(net._forward_hooks))
        with edit.sampled(pipe) as sampler:
            assert (dict(denoiser(sampler)._forward_pre_hooks), dict(denoiser(sampler)._forward_hooks)) != hooks
        assert (dict(net._forward_pre_hooks), dict(net._forward_hooks)) == hooks
        assert not _differences(before, pipe)
        return
    edit.apply(pipe)
    try:
        changed = {k.split("#")[0] for k in _differences(before, pipe)}
        assert changed and changed <= set(edit.keys), sorted(changed - set(edit.keys))[:5]
        for key in edit.keys:   # the applied weights are exactly the Edit's
            assert torch.equal(pipe.components[key.split("/")[0]].get_parameter(key.split("/", 1)[1]),
                               edit.new_weight(key, before[key]))
    finally:
        edit.remove(pipe)
    assert not _differences(before, pipe)


@pytest.mark.parametrize("method, family", CASES)
def test_save_load_is_bit_exact(matrix, method, family, tmp_path):
    pipe, before, edit = _edit(matrix, method, family)
    loaded = Edit.load(edit.save(tmp_path / f"{method}.safetensors"), pipe)
    assert loaded.keys == edit.keys
    assert loaded.weights.keys() == edit.weights.keys() and loaded.deltas.keys() == edit.deltas.keys()
    for key, w in edit.weights.items():
        assert loaded.weights[key].dtype == w.dtype and torch.equal(loaded.weights[key], w), key
    for key, (u, v) in edit.deltas.items():
        lu, lv = loaded.deltas[key]
        assert torch.equal(lu, u) and torch.equal(lv, v) and (lu.dtype, lv.dtype) == (u.dtype, v.dtype), key
    assert loaded.manifest == json.loads(json.dumps(edit.manifest))
    assert loaded.one_step == edit.one_step
    assert not _differences(before, pipe)


# bfloat16: the CPU's native half type (an SDXL pipeline in float16 upcasts its VAE through a
# deprecated diffusers path, which the test suite turns into an error).
HALF = torch.bfloat16


@pytest.mark.parametrize("method, family", CASES)
def test_half_precision_pipeline_gives_finite_images(matrix, method, family):
    pipe, before, edit = _edit(matrix, method, family)
    half = copy.deepcopy(pipe).to(HALF)
    with edit.sampled(half) as sampler:
        if not edit.one_step and edit.keys:
            key = edit.keys[0]
            assert half.components[key.split("/")[0]].get_parameter(key.split("/", 1)[1]).dtype == HALF
        sampling = default_sampling(half, steps=2, guidance=3.0, height=16, width=16)   # DDIM or flow matching
        images = generate(sampler, ["a photo of Van Gogh", "a cat"], [0, 1], sampling, output_type="pt", check=False)
    images = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
    assert images.numel() and torch.isfinite(images.float()).all()
    assert not _differences(before, pipe)


def _plain(value):
    return json.loads(json.dumps(value))


@pytest.mark.parametrize("method, family", CASES)
def test_manifest_is_complete(matrix, method, family):
    pipe, _, edit = _edit(matrix, method, family)
    m = edit.manifest
    missing = [k for k in MANIFEST_KEYS if k not in m]
    assert not missing, f"manifest lacks {missing}"
    assert (m["method"], m["concepts"], m["family"]) == (method, CONCEPTS, family)
    assert m["kind"] in KINDS
    # the tiny pipelines are no world of their own: the paper's defaults, every resolved value recorded
    assert m["preset"]["provider"] == "paper" and m["preset"]["name"] and m["preset"]["values"]
    assert m["erasekit_version"] == erasekit.__version__
    config_cls = registry.methods()[method]
    assert set(m["config"]) == {f.name for f in dataclasses.fields(config_cls)}
    for name, value in TINY.get(method, {}).items():   # the options given are the options recorded
        assert _plain(m["config"][name]) == _plain(value), name
    assert m["fingerprint"]["id"] and set(m["fingerprint"]["stats"]) == set(edit.keys)
    json.dumps(m)   # the manifest is JSON (it goes into the safetensors header)


def _bad_options(method: str) -> list[tuple[str, object]]:
    names = {f.name for f in dataclasses.fields(registry.methods()[method])}
    cases = [("no_such_option", 1)]
    cases += [("preset", "no-such-preset")] if "preset" in names else []
    cases += [("param_set", "no-such-set")] if "param_set" in names else []
    return cases + list(BAD.get(method, {}).items())


@pytest.mark.parametrize("method, family", CASES)
def test_bad_option_is_a_config_error_and_leaves_the_pipeline(matrix, method, family):
    pipe, before = matrix.pipe(family)
    supported = family in registry.supported_families(method)
    for name, value in _bad_options(method):   # options checked against the pipeline come after its family's
        with pytest.raises(ConfigError, match=name if supported or name != "param_set" else family):
            erasekit.erase(pipe, method, CONCEPTS, **{**TINY.get(method, {}), name: value})
        assert not _differences(before, pipe), f"{name}={value!r} left the pipeline changed"

"""The Edit: exact apply/remove, save/load round trip, strict loading."""

import json

import pytest
import torch

from erasekit.errors import EditError
from erasekit.pipelines import Edit, cross_attention_kv, low_rank_factors


def _random_edit(pipe, rank1=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    new = {}
    for name, m in cross_attention_kv(pipe.unet).items():
        w = m.weight.detach()
        if rank1:
            delta = torch.outer(torch.randn(w.shape[0], generator=g), torch.randn(w.shape[1], generator=g))
        else:
            delta = torch.randn(w.shape, generator=g)
        new[f"unet/{name}.weight"] = w + 0.1 * delta
    return Edit.from_weights(pipe, new, {"method": "test", "concepts": ["x"]}), new


def _state(pipe):
    return {f"{c}/{k}": v.clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items()}


def test_apply_remove_bitwise_exact(tiny_pipe):
    edit, new = _random_edit(tiny_pipe, rank1=False)
    before = _state(tiny_pipe)
    edit.apply(tiny_pipe)
    key = next(iter(new))
    assert torch.equal(tiny_pipe.unet.get_parameter(key.split("/", 1)[1]), new[key])
    edit.remove(tiny_pipe)
    after = _state(tiny_pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_applied_context_restores_on_error(tiny_sd1):
    edit, _ = _random_edit(tiny_sd1)
    before = _state(tiny_sd1)
    with pytest.raises(RuntimeError):
        with edit.applied(tiny_sd1):
            raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in _state(tiny_sd1).items())


def test_low_rank_storage_is_exact_and_small(tiny_sd1):
    edit, new = _random_edit(tiny_sd1, rank1=True)
    assert edit.deltas and not edit.weights
    for key, (u, v) in edit.deltas.items():
        assert u.shape[1] == 1
        base = tiny_sd1.unet.get_parameter(key.split("/", 1)[1]).detach()
        assert torch.allclose(base + u @ v, new[key], atol=1e-5)
    dense = sum(w.numel() * 4 for w in new.values())
    assert edit.nbytes() < dense / 2


def test_low_rank_factors_refuses_full_rank():
    assert low_rank_factors(torch.randn(8, 8)) is None
    u, v = low_rank_factors(torch.outer(torch.randn(16), torch.randn(12)))
    assert u.shape == (16, 1) and v.shape == (1, 12)


def test_save_load_round_trip(tiny_pipe, tmp_path):
    edit, _ = _random_edit(tiny_pipe, rank1=False)
    path = edit.save(tmp_path / "e.safetensors")
    loaded = Edit.load(path, tiny_pipe)
    assert loaded.manifest == json.loads(json.dumps(edit.manifest))
    assert all(torch.equal(loaded.weights[k], edit.weights[k]) for k in edit.weights)
    with loaded.applied(tiny_pipe):
        a = {k: tiny_pipe.unet.get_parameter(k.split("/", 1)[1]).clone() for k in edit.keys}
    with edit.applied(tiny_pipe):
        b = {k: tiny_pipe.unet.get_parameter(k.split("/", 1)[1]).clone() for k in edit.keys}
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fingerprint_mismatch_refused(clip_tokenizer_dir, tmp_path):
    from conftest import build_tiny

    a = build_tiny("sd1", clip_tokenizer_dir)
    b = build_tiny("sd1", clip_tokenizer_dir)
    with torch.no_grad():
        for p in b.unet.parameters():
            p.add_(torch.randn_like(p))
    edit, _ = _random_edit(a)
    path = edit.save(tmp_path / "e.safetensors")
    with pytest.raises(EditError, match="different base model"):
        Edit.load(path, b)
    before = _state(b)
    with pytest.raises(EditError):
        edit.apply(b)
    assert all(torch.equal(before[k], v) for k, v in _state(b).items())


def test_fingerprint_tolerates_half_precision(tiny_sd1):
    edit, _ = _random_edit(tiny_sd1)
    tiny_sd1.unet.to(torch.bfloat16)
    edit.check(tiny_sd1)  # same model in another dtype still matches


def test_wrong_family_refused(clip_tokenizer_dir, tmp_path):
    from conftest import build_tiny

    edit, _ = _random_edit(build_tiny("sd1", clip_tokenizer_dir))
    path = edit.save(tmp_path / "e.safetensors")
    with pytest.raises(EditError):
        Edit.load(path, build_tiny("sdxl", clip_tokenizer_dir))


def test_truncated_file_refused(tiny_sd1, tmp_path):
    edit, _ = _random_edit(tiny_sd1, rank1=False)
    path = edit.save(tmp_path / "e.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(EditError, match="truncated or corrupt"):
        Edit.load(tmp_path / "cut.safetensors")


def test_missing_key_refused(tiny_sd1, tmp_path):
    from safetensors.torch import load_file, save_file

    edit, _ = _random_edit(tiny_sd1, rank1=False)
    path = edit.save(tmp_path / "e.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata=meta)
    with pytest.raises(EditError, match="missing"):
        Edit.load(tmp_path / "m.safetensors")


def test_non_finite_refused(tiny_sd1):
    name, m = next(iter(cross_attention_kv(tiny_sd1.unet).items()))
    w = m.weight.detach().clone()
    w[0, 0] = float("nan")
    with pytest.raises(EditError, match="NaN"):
        Edit.from_weights(tiny_sd1, {f"unet/{name}.weight": w}, {})


def test_double_apply_refused(tiny_sd1):
    edit, _ = _random_edit(tiny_sd1)
    edit.apply(tiny_sd1)
    with pytest.raises(EditError, match="already applied"):
        edit.apply(tiny_sd1)
    edit.remove(tiny_sd1)
    with pytest.raises(EditError, match="not applied"):
        edit.remove(tiny_sd1)


def test_methods_write_only_the_components_they_declare(tiny_sd1):
    from dataclasses import dataclass

    from erasekit.erase.registry import _MODULES, MethodConfig, erase, get_method, register
    from erasekit.errors import ConfigError
    from erasekit.pipelines.edit import declared_components

    for name in _MODULES:   # every built-in method declares what it changes
        get_method(name)
        assert declared_components(name) in {("unet",), ("unet", "transformer"),   # UCE: UNet or MMDiT
                                              ("text_encoder", "text_encoder_2")}, name
    assert declared_components("advunlearn") == ("text_encoder", "text_encoder_2")

    @dataclass
    class NoOptions(MethodConfig):
        pass

    te_key = "text_encoder/" + next(n for n, p in tiny_sd1.text_encoder.named_parameters() if "fc1.weight" in n)

    @register("test-declares-unet", NoOptions, components=("unet",))
    def writes_text_encoder(pipe, concepts, config):
        w = pipe.text_encoder.get_parameter(te_key[len("text_encoder/"):]).detach()
        return Edit.from_weights(pipe, {te_key: w + 1}, {}, low_rank=False)

    before = _state(tiny_sd1)
    with pytest.raises(ConfigError, match="changes only unet, but this run changed 'text_encoder/"):
        erase(tiny_sd1, "test-declares-unet", ["x"], allow_unknown_concept=True)
    assert all(torch.equal(before[k], v) for k, v in _state(tiny_sd1).items())
    with pytest.raises(ConfigError, match="components among"):
        register("test-declares-vae", NoOptions, components=("vae",))(writes_text_encoder)


def test_low_rank_factors_rank_follows_the_dtype_tolerance():
    """Rank counts singular values above max(m, n) * eps(dtype) * s_max: float32 rounding of an exact
    rank-2 product is not rank, a real perturbation far above the tolerance is."""
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(64, 2, generator=g) @ torch.randn(2, 48, generator=g)
    u, v = low_rank_factors(exact)
    assert u.shape[1] == 2 and torch.allclose(u @ v, exact, atol=1e-5)
    assert low_rank_factors(exact + 1e-3 * torch.randn(64, 48, generator=g)) is None

"""UCE and its closed-form solver: the maths (normal equations, exact low rank), the mechanics on the
three families, presets, bad input; and one behaviour check on canvas-mini."""

import json

import pytest
import torch

import erasekit
from erasekit.erase.closed_form import UCEFitter, kv_weights
from erasekit.erase.uce import PRESETS, PromptEncoder, UCEConfig, erase_rows, resolve, uce, uce_fitter
from erasekit.errors import ConfigError
from erasekit.pipelines import FamilyAdapter, cross_attention_kv


def _state(pipe):
    return {f"{c}/{k}": v.clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fitter(pipe, concepts, **options):
    return uce_fitter(PromptEncoder(FamilyAdapter(pipe)), resolve(UCEConfig(**options), concepts))


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Run the test with torch on 1 and on 2 intra-op threads (BLAS/LAPACK round differently), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("solve_dtype", ["float32", "float64"])
def test_solution_meets_normal_equations(tiny_pipe, threads, solve_dtype):
    fitter = _fitter(tiny_pipe, ["Van Gogh", "nudity"], guide=["art", ""], preserve=["Monet", "a tree"],
                     preset="default", lamb=0.3, preserve_scale=0.5, solve_dtype=solve_dtype)
    update = fitter.solve()
    assert update.P.dtype == getattr(torch, solve_dtype)
    eps, ev = torch.finfo(update.P.dtype).eps, torch.linalg.eigvalsh(fitter.B)
    d, cond = fitter.dim, (ev[-1] / ev[0]).item()
    for key, W_ref in kv_weights(tiny_pipe).items():
        W = W_ref.double() @ update.dense().double()               # the shared-factor solution
        A = fitter.A(W_ref)
        assert (W @ fitter.B - A).norm() / A.norm() < 4 * d * eps  # a backward-stable solve's residual
        direct = torch.linalg.solve(fitter.B, A.T).T               # a per-layer float64 solve of W B = A
        assert (W - direct).norm() / direct.norm() < d * eps * cond


def _exactly_singular_fitter(dtype, dim=8, rank=5, n=40, lam=0.0):
    """A fitter whose key rows span only ``rank`` of ``dim`` coordinates (their other entries are exactly
    0), so ``B`` has ``dim - rank`` eigenvalues exactly 0 whatever the rounding; small integers throughout."""
    g = torch.Generator().manual_seed(0)
    keys = torch.zeros(n, dim)
    keys[:, :rank] = torch.randint(-3, 4, (n, rank), generator=g).float()
    guides = keys.clone()
    guides[:, 0] += 1
    fitter = UCEFitter(dim, lam=lam, dtype=dtype)
    fitter.update(keys, guides)
    return fitter


@pytest.mark.parametrize("solve_dtype", [torch.float32, torch.float64])
def test_singularity_is_decided_by_eigenvalues_far_from_the_tolerance(threads, solve_dtype):
    singular = _exactly_singular_fitter(solve_dtype)
    lam_min, tol, _ = singular.solvability()
    assert abs(lam_min) <= 1e-12 * tol                      # exactly 0 up to eigvalsh's own rounding
    with pytest.raises(ConfigError, match="singular"):
        singular.solve()
    full = _exactly_singular_fitter(solve_dtype, rank=8)     # every coordinate used: solvable
    lam_min, tol, solve_tol = full.solvability()
    assert lam_min > 1e4 * max(tol, solve_tol)
    assert torch.isfinite(full.solve().dense()).all()
    ridge = _exactly_singular_fitter(solve_dtype, lam=0.5)   # the ridge makes the singular rows solvable
    assert ridge.solvability()[0] >= 0.5 - 1e-9 and torch.isfinite(ridge.solve().dense()).all()


def test_float32_solve_refused_where_float64_is_exact(threads):
    """Condition number 1e9: far beyond float32 (eps 1.2e-7 x ||B||) and far inside float64."""
    scales = torch.logspace(0, -4.5, 8, dtype=torch.float64)     # singular values 1 .. 3.2e-5
    keys = torch.diag(scales)
    guides = keys.clone()
    guides[0, 0] = 0
    for dtype, ok in ((torch.float64, True), (torch.float32, False)):
        fitter = UCEFitter(8, lam=0.0, dtype=dtype)
        fitter.update(keys, guides)
        lam_min, tol, solve_tol = fitter.solvability()
        assert lam_min > 100 * tol                                # not singular in either dtype
        if ok:
            assert lam_min > 100 * solve_tol and torch.isfinite(fitter.solve().dense()).all()
        else:
            assert lam_min < solve_tol / 100
            with pytest.raises(ConfigError, match="too ill-conditioned for a float32 solve"):
                fitter.solve()


@pytest.mark.parametrize("family", ["sd1", "sd2"])   # SDXL's rows join two encoders': no such null direction
def test_singular_text_rows_refused(clip_tokenizer_dir, family, threads):
    """A freshly initialised CLIP ends in a LayerNorm with weight 1 and bias 0, so every key row sums to 0:
    with ``lamb`` = 0 the rows span at most d - 1 dimensions and B is singular in exact arithmetic (its
    computed smallest eigenvalue is rounding noise, orders of magnitude below the tolerance)."""
    from conftest import build_tiny

    tiny_pipe = build_tiny(family, clip_tokenizer_dir)
    fitter = _fitter(tiny_pipe, ["Van Gogh"], lamb=0.0, preset="default")
    ones = torch.ones(fitter.dim, dtype=torch.float64) / fitter.dim ** 0.5
    assert (ones @ fitter.B @ ones) < 1e-10 * torch.linalg.eigvalsh(fitter.B)[-1]   # the null direction
    lam_min, tol, _ = fitter.solvability()
    assert lam_min < tol / 100
    before = _state(tiny_pipe)
    with pytest.raises(ConfigError, match="singular"):
        erasekit.erase(tiny_pipe, "uce", ["Van Gogh"], lamb=0.0, preset="default")
    assert _same(before, _state(tiny_pipe))


def test_only_preserve_rows_with_ridge_keep_weights(tiny_sd1):
    adapter = FamilyAdapter(tiny_sd1)
    fitter = UCEFitter(adapter.context_dim, lam=0.5)
    fitter.update(adapter.encode(["a cat", "Monet", ""]).embeds.flatten(0, 1))
    for W_ref in kv_weights(tiny_sd1).values():
        W = torch.linalg.solve(fitter.B, fitter.A(W_ref).T).T
        assert torch.allclose(W, W_ref.double(), atol=1e-10)
    before = _state(tiny_sd1)   # through the method: a concept guided to itself moves nothing
    edit = erasekit.erase(tiny_sd1, "uce", ["Monet"], guide="Monet", preserve=["a cat"])
    with edit.applied(tiny_sd1):
        assert _same(before, _state(tiny_sd1))


def test_edit_touches_only_kv_and_apply_remove_is_exact(tiny_pipe):
    before = _state(tiny_pipe)
    edit = erasekit.erase(tiny_pipe, "uce", ["Van Gogh"], preset="style")
    assert _same(before, _state(tiny_pipe))                         # erase() leaves the pipeline as it was
    expected = {f"unet/{n}.weight" for n in cross_attention_kv(tiny_pipe.unet)}
    assert set(edit.keys) == expected                               # SDXL: every cross-attention layer
    edit.apply(tiny_pipe)
    changed = {k for k in before if not torch.equal(before[k], _state(tiny_pipe)[k])}
    assert changed == expected
    edit.remove(tiny_pipe)
    assert _same(before, _state(tiny_pipe))


@pytest.mark.parametrize("solve_dtype", ["float32", "float64"])
@pytest.mark.parametrize("policy,rank", [("last_word", 1), ("aligned_tail", None)])
def test_low_rank_factors_are_exact(tiny_sd1, tmp_path, policy, rank, solve_dtype, threads):
    fitter = _fitter(tiny_sd1, ["nudity"], preset="nudity", token_policy=policy, solve_dtype=solve_dtype)
    dense = {k: (w.double() @ fitter.solve().dense().double()) for k, w in kv_weights(tiny_sd1).items()}
    edit = erasekit.erase(tiny_sd1, "uce", ["nudity"], preset="nudity", token_policy=policy, solve_dtype=solve_dtype)
    if rank is not None:   # one erase row: every change is stored as rank-1 factors
        assert set(edit.deltas) == set(dense) and all(u.shape[1] == 1 for u, _ in edit.deltas.values())
    path = edit.save(tmp_path / "uce.safetensors")
    loaded = erasekit.Edit.load(path, pipe=tiny_sd1)
    with loaded.applied(tiny_sd1):
        for key, W in dense.items():
            now = tiny_sd1.unet.get_parameter(key.split("/", 1)[1]).double()
            assert torch.allclose(now, W, atol=1e-6 * W.abs().max())


def test_erase_rows_map_to_their_guides_and_preserve_rows_stay(tiny_sd1):
    adapter = FamilyAdapter(tiny_sd1)
    concepts, guides, keep = ["Van Gogh", "nudity"], ["art", "a dog"], ["Monet", "a tree"]
    enc = adapter.encode(concepts + guides + keep).embeds
    last = adapter.tokenize(concepts + guides + keep).last_word_index
    edit = erasekit.erase(tiny_sd1, "uce", concepts, guide=guides, preserve=keep, preset="default",
                          token_policy="last_word", erase_scale=100.0, preserve_scale=100.0, lamb=0.01)
    W_ref = {k: w.clone() for k, w in kv_weights(tiny_sd1).items()}
    with edit.applied(tiny_sd1):
        for key, W in kv_weights(tiny_sd1).items():
            for i in range(2):   # each concept's key now gives its own guide's output
                c, g = enc[i, last[i]], enc[2 + i, last[2 + i]]
                before = (W_ref[key] @ c - W_ref[key] @ g).norm()
                assert (W @ c - W_ref[key] @ g).norm() < 0.05 * before
            for j in range(4, 6):
                c = enc[j, last[j]]
                assert (W @ c - W_ref[key] @ c).norm() < 0.05 * (W_ref[key] @ c).norm()


def test_half_precision_pipeline_solves_in_float64(tiny_sd1):
    edit32 = erasekit.erase(tiny_sd1, "uce", ["Van Gogh"], preset="style")
    pipe = tiny_sd1.to(torch.float16)
    before = _state(pipe)
    edit16 = erasekit.erase(pipe, "uce", ["Van Gogh"], preset="style")
    with edit16.applied(pipe):
        for key, w in kv_weights(pipe).items():
            assert w.dtype == torch.float16 and torch.isfinite(w).all()
            w32 = edit32.new_weight(key, before[key].float())
            assert torch.allclose(w.float(), w32, atol=2e-2 * w32.abs().max())
    assert _same(before, _state(pipe))


def test_token_policies_pick_the_documented_rows():
    c, g = torch.arange(77.0)[:, None], 100 + torch.arange(77.0)[:, None]
    k, v = erase_rows("last_word", c, g, 3, 0)
    assert k.flatten().tolist() == [3] and v.flatten().tolist() == [100]
    k, v = erase_rows("aligned_tail", c, g, 3, 1)   # m = 3: rows [3, 77) and [1, 75)
    assert k.flatten().tolist() == list(range(3, 77)) and v.flatten().tolist() == list(range(101, 175))
    k, v = erase_rows("all_77", c, g, 3, 1)
    assert k.shape[0] == v.shape[0] == 77


def test_presets_load_and_resolve(canvas_pipe):
    for name in PRESETS:
        s = resolve(UCEConfig(preset=name), ["Van Gogh"])
        assert s.preset == name and s.token_policy == PRESETS[name]["token_policy"]
    assert resolve(UCEConfig(preset="style"), ["Monet"]).guides == ["art"]
    assert resolve(UCEConfig(preset="style"), ["Monet"]).preserve_scale == 0.1
    nudity = resolve(UCEConfig(preset="nudity"), ["nudity"])
    assert (nudity.guides, nudity.preserve, nudity.preserve_scale, nudity.lamb) == ([" "], [""], 1.0, 0.5)
    style = resolve(UCEConfig(), ["Van_Gogh", "Pop Art"], canvas_pipe)   # canvas-mini's provider: canvas-style
    assert style.preset == "canvas-style" and style.concepts == ["Van Gogh", "Pop Art"]
    assert "Van Gogh" not in style.preserve and "Cubism" in style.preserve
    assert "A Cats image in {} style." in style.templates
    assert style.guides == ["Cubism", "Cubism"] and resolve(UCEConfig(), ["Cubism"], canvas_pipe).guides == ["Mosaic"]
    objects = resolve(UCEConfig(), ["Cats"], canvas_pipe)
    assert objects.preset == "canvas-object" and objects.guides == ["Architectures"]
    assert "A {} image in Van Gogh style." in objects.templates
    assert resolve(UCEConfig(), ["Van_Gogh", "Pop Art"]).preset == "default"   # no model: the papers' presets
    assert resolve(UCEConfig(), ["nudity"]).preset == "nudity"
    assert resolve(UCEConfig(kind="style"), ["Greg Rutkowski"]).preset == "style"
    assert resolve(UCEConfig(), ["Greg Rutkowski"]).preset == "default"
    assert resolve(UCEConfig(preset="style", lamb=2.0), ["Monet"]).lamb == 2.0   # options win over presets
    assert resolve(UCEConfig(preset="default", preserve=["a", "b", "c", "d", "e"]), ["x"]).preserve_scale == 1 / 6


def test_manifest_records_the_resolved_settings(tiny_sd1, tmp_path):
    edit = erasekit.erase(tiny_sd1, "uce", ["Van Gogh", "Monet"], guide=["art", "a painting"])
    man = json.loads(json.dumps(edit.manifest))
    assert man["method"] == "uce" and man["resolved"]["guides"] == ["art", "a painting"]
    assert man["resolved"]["token_policy"] == "aligned_tail" and man["config"]["preset"] == "auto"


@pytest.mark.parametrize("options,concepts,match", [
    ({"preset": "picasso"}, ["x"], "preset"),
    ({"token_policy": "first_word"}, ["x"], "token_policy"),
    ({"guide": ["art", "art"]}, ["x"], "guide"),
    ({"guide": "art " * 80}, ["Van Gogh"], "tokens"),
    ({"lamb": 0.0, "preset": "default"}, ["Van Gogh"], "singular"),
    ({"lamb": -1.0}, ["x"], "lamb"),
    ({"templates": ["no placeholder"]}, ["x"], "templates"),
    ({"stepz": 3}, ["x"], "no option"),
])
def test_bad_input_is_refused_and_pipeline_unchanged(tiny_sd1, options, concepts, match):
    before = _state(tiny_sd1)
    with pytest.raises(ConfigError, match=match):
        erasekit.erase(tiny_sd1, "uce", concepts, **options)
    assert _same(before, _state(tiny_sd1))


def test_concept_that_tokenizes_to_nothing(tiny_sd1):
    before = _state(tiny_sd1)
    with pytest.raises(ConfigError, match="tokenizes to no tokens"):
        uce(tiny_sd1, ["\u3000"], UCEConfig())
    assert _same(before, _state(tiny_sd1))


def test_erasing_a_style_on_canvas_mini(canvas_pipe, canvas_judge):
    from erasekit.canvas.world import OBJECTS, caption
    from erasekit.pipelines import Sampling, generate

    objs, seeds = OBJECTS[:5], [0, 1]
    sampling = Sampling(steps=15)

    def accuracy(style):
        prompts = [caption(o, style) for o in objs for _ in seeds]
        images = generate(canvas_pipe, prompts, seeds * len(objs), sampling)
        return canvas_judge.hits(images, style).mean()

    base = accuracy("Van_Gogh"), accuracy("Winter")
    edit = erasekit.erase(canvas_pipe, "uce", ["Van Gogh"])
    with edit.applied(canvas_pipe):
        after = accuracy("Van_Gogh"), accuracy("Winter")
    assert base[0] >= 0.7 and after[0] <= 0.2            # the judge stops seeing the target style
    assert after[1] >= base[1] - 0.2                     # another style stays

"""The fine-tuning engine: trained subset only, exact restore, masks, seeding, checkpoints, two processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from erasekit.errors import ConfigError, TrainingError
from erasekit.erase.engine import CHECKPOINT_NAME, TrainConfig, Trainer
from erasekit.erase.param_sets import param_sets, select_params
from erasekit.pipelines import FamilyAdapter


def _state(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _loss_fn(pipe, trainer, calls=None, fail_at=None, nan_at=None):
    ctx = FamilyAdapter(pipe).encode(["a photo of a cat", ""])

    def loss_fn(i):
        if calls is not None:
            calls.append(i)
        if fail_at is not None and i == fail_at:
            raise KeyboardInterrupt  # a killed run
        x = torch.randn(1, 4, 8, 8, generator=trainer.rng)
        t = torch.randint(0, 1000, (1,), generator=trainer.rng)
        target = trainer.frozen(pipe.unet, x, t, **ctx[1:2].unet_kwargs(pipe)).sample
        loss = F.mse_loss(pipe.unet(x, t, **ctx[0:1].unet_kwargs(pipe)).sample.float(), target.float() + 0.5)
        return loss * float("nan") if nan_at is not None and i >= nan_at else loss

    return loss_fn


def _train(pipe, set_name="esd-x", **options):
    options = {"steps": 4, "lr": 1e-2, "progress": False, **options}
    with Trainer(pipe, select_params(pipe, set_name), TrainConfig(**options)) as tr:
        return tr.fit(_loss_fn(pipe, tr))


def test_trains_only_the_selected_set_and_restores_the_pipeline(tiny_sd1):
    before = _state(tiny_sd1)
    flags = {n: p.requires_grad for n, p in tiny_sd1.unet.named_parameters()}
    edit = _train(tiny_sd1)
    assert _same(before, _state(tiny_sd1))
    assert flags == {n: p.requires_grad for n, p in tiny_sd1.unet.named_parameters()}
    assert not tiny_sd1.unet.is_gradient_checkpointing
    assert set(edit.keys) == set(select_params(tiny_sd1, "esd-x")) and not edit.deltas
    with edit.applied(tiny_sd1):
        changed = {k for k, v in _state(tiny_sd1).items() if not torch.equal(v, before[k])}
    assert changed == {k.split("/", 1)[1] for k in edit.keys}
    assert edit.manifest["training"]["steps"] == 4


def test_param_sets_are_disjoint_where_they_should_be(tiny_pipe):
    x, u = set(select_params(tiny_pipe, "esd-x")), set(select_params(tiny_pipe, "esd-u"))
    strict, full = set(select_params(tiny_pipe, "esd-x-strict")), set(select_params(tiny_pipe, "full"))
    assert strict < x and not x & u and (x | u) < full  # norms belong to neither esd-x nor esd-u
    assert all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in strict)
    assert set(select_params(tiny_pipe, "xattn")) == x
    nox = set(select_params(tiny_pipe, "noxattn"))
    assert not nox & x and not any(k.startswith(("unet/time_embedding", "unet/conv_out")) for k in nox)
    assert {"esd-x", "esd-u", "esd-x-strict", "full", "xattn"} <= set(param_sets())


def test_bad_param_sets_are_refused(tiny_sd1):
    with pytest.raises(ConfigError, match="param_set must be one of"):
        select_params(tiny_sd1, "attn-everything")
    with pytest.raises(ConfigError, match="selects no parameters"):
        Trainer(tiny_sd1, {}, TrainConfig(steps=1, lr=1e-3))


def test_frozen_runs_the_original_weights_while_training(tiny_sd1):
    ctx = FamilyAdapter(tiny_sd1).encode(["a cat"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    kw = ctx.unet_kwargs(tiny_sd1)
    with torch.no_grad():
        reference = tiny_sd1.unet(x, t, **kw).sample
    seen = []
    with Trainer(tiny_sd1, select_params(tiny_sd1, "esd-x"), TrainConfig(steps=3, lr=1e-2, progress=False)) as tr:
        inner = _loss_fn(tiny_sd1, tr)

        def loss_fn(i):
            with torch.no_grad():
                seen.append((tr.frozen(tiny_sd1.unet, x, t, **kw).sample, tiny_sd1.unet(x, t, **kw).sample))
            return inner(i)

        tr.fit(loss_fn)
    assert all(torch.equal(frozen, reference) for frozen, _ in seen)
    assert not torch.allclose(seen[-1][1], reference)  # while the trained weights did move


def test_masked_weights_never_move_even_with_adamw_weight_decay(tiny_sd1):
    params = select_params(tiny_sd1, "full")
    gen = torch.Generator().manual_seed(0)
    mask = {k: torch.rand(p.shape, generator=gen) < 0.3 for k, p in params.items()}
    before = _state(tiny_sd1)
    cfg = TrainConfig(steps=3, lr=1e-2, optimizer="adamw", weight_decay=0.5, max_grad_norm=1.0, progress=False)
    with Trainer(tiny_sd1, params, cfg) as tr:
        tr.set_mask(mask)
        edit = tr.fit(_loss_fn(tiny_sd1, tr))
    for key in edit.keys:
        new, old, m = edit.weights[key], before[key.split("/", 1)[1]], mask[key]
        assert torch.equal(new[~m], old[~m])
    moved = sum(int((edit.weights[k] != before[k.split("/", 1)[1]]).sum()) for k in edit.keys)
    assert moved > 0.5 * sum(int(m.sum()) for m in mask.values())
    assert abs(edit.manifest["training"]["mask_density"] - 0.3) < 0.02


def test_same_seed_same_edit_other_seed_other_edit(tiny_sd1):
    a, b, c = _train(tiny_sd1, seed=1), _train(tiny_sd1, seed=1), _train(tiny_sd1, seed=2)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.keys)
    assert not all(torch.equal(a.weights[k], c.weights[k]) for k in a.keys)


def test_gradient_accumulation_calls_the_loss_per_micro_step(tiny_sd1):
    calls = []
    with Trainer(tiny_sd1, select_params(tiny_sd1, "esd-x-strict"),
                 TrainConfig(steps=2, lr=1e-3, grad_accum=3, progress=False)) as tr:
        tr.fit(_loss_fn(tiny_sd1, tr, calls=calls))
    assert calls == list(range(6)) and len(tr.history) == 2


def test_bf16_and_checkpointing_train_without_nan(tiny_sd1):
    edit = _train(tiny_sd1, mixed_precision="bf16", gradient_checkpointing=True)
    assert all(torch.isfinite(w).all() for w in edit.weights.values())
    assert not tiny_sd1.unet.is_gradient_checkpointing


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tiny_sd1, tmp_path):
    full = _train(tiny_sd1, steps=6)
    opts = dict(steps=6, lr=1e-2, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    before = _state(tiny_sd1)
    with pytest.raises(KeyboardInterrupt):
        with Trainer(tiny_sd1, select_params(tiny_sd1, "esd-x"), TrainConfig(**opts)) as tr:
            tr.fit(_loss_fn(tiny_sd1, tr, fail_at=5))
    assert _same(before, _state(tiny_sd1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no half-written files
    calls = []
    with Trainer(tiny_sd1, select_params(tiny_sd1, "esd-x"), TrainConfig(**opts)) as tr:
        resumed = tr.fit(_loss_fn(tiny_sd1, tr, calls=calls))
    assert calls[0] == 4 and resumed.manifest["training"]["resumed_from"] == 4
    assert all(torch.equal(full.weights[k], resumed.weights[k]) for k in full.keys)


def test_checkpoint_of_another_run_is_refused(tiny_sd1, tmp_path):
    _train(tiny_sd1, steps=2, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    with pytest.raises(ConfigError, match="different run"):
        _train(tiny_sd1, steps=2, lr=5e-3, checkpoint_dir=str(tmp_path))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_sd1, tmp_path):
    before = _state(tiny_sd1)
    opts = dict(steps=6, lr=1e-2, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    with pytest.raises(TrainingError, match="last good checkpoint"):
        with Trainer(tiny_sd1, select_params(tiny_sd1, "esd-x"), TrainConfig(**opts)) as tr:
            tr.fit(_loss_fn(tiny_sd1, tr, nan_at=3))
    assert _same(before, _state(tiny_sd1))
    from erasekit._io import load_tensors

    tensors, meta = load_tensors(tmp_path / CHECKPOINT_NAME)
    assert meta["step"] == "2" and all(torch.isfinite(v).all() for v in tensors.values())


@pytest.mark.parametrize("bad", [dict(steps=0), dict(grad_accum=0), dict(mixed_precision="fp8"),
                                 dict(optimizer="sgd"), dict(lr=-1.0)])
def test_bad_options_name_the_field(bad):
    with pytest.raises(ConfigError, match=f"`{next(iter(bad))}`"):
        TrainConfig(**bad)


def test_two_processes_end_with_identical_weights(tmp_path, clip_tokenizer_dir):
    worker = Path(__file__).resolve().parent / "_ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(worker), str(tmp_path), str(clip_tokenizer_dir)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    from erasekit._io import load_tensors

    (a, meta_a), (b, meta_b) = (load_tensors(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert meta_a["world"] == meta_b["world"] == "2"
    assert meta_a["first_loss"] != meta_b["first_loss"]  # each rank drew its own samples
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)


def test_pipeline_digest_is_exact_and_thread_independent(tiny_sd1):
    from erasekit.erase.engine import pipeline_digest

    before = pipeline_digest(tiny_sd1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert pipeline_digest(tiny_sd1) == before
    finally:
        torch.set_num_threads(threads)
    w = tiny_sd1.unet.conv_in.weight.view(-1)
    with torch.no_grad():
        old = w[5].clone()
        w[5] = torch.nextafter(old, torch.tensor(1.0))   # one ulp
    assert pipeline_digest(tiny_sd1) != before
    with torch.no_grad():
        w[5] = old
    assert pipeline_digest(tiny_sd1) == before
    tiny_sd1.scheduler.register_to_config(prediction_type="v_prediction")
    assert pipeline_digest(tiny_sd1) != before

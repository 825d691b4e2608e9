"""The preview's handlers, called directly (no browser, no server): what a visitor may read, load and
run, and that every failure reaches the UI with its message.

Everything runs on one tiny SD-1 pipeline (a few seconds for the module); the planted files sit in
a folder next to the allowed root, reached by ``..``, absolute paths and symlinks.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("gradio")

from erasekit.errors import ConfigError, ErasekitError  # noqa: E402
from erasekit.preview import app as preview  # noqa: E402

MODEL = "tiny-sd1"
PROMPT = "A painting in Van Gogh style."


@pytest.fixture(scope="module")
def tiny(clip_tokenizer_dir):
    """One tiny SD-1 pipeline for the module: every test leaves its weights as they were."""
    from conftest import build_tiny

    return build_tiny("sd1", clip_tokenizer_dir)


def _zero_values_edit(pipe, concept="everything"):
    from erasekit.pipelines import Edit, cross_attention_kv

    keys = {f"unet/{name}.weight": torch.zeros_like(lin.weight)
            for name, lin in cross_attention_kv(pipe.unet).items() if name.endswith("to_v")}
    return Edit.from_weights(pipe, keys, {"method": "zero-values", "concepts": [concept]})


@pytest.fixture
def world(tmp_path, tiny):
    """An allowed root with a report and an Edit, and, outside it, planted secrets and links to them."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "report").mkdir(parents=True)
    outside.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), (0, 200, 0)).save(root / "report" / "grid.png")
    (root / "report" / "report.md").write_text("# the allowed report")
    Image.new("RGB", (8, 8), (200, 0, 0)).save(outside / "secret.png")
    (outside / "secret.md").write_text("# SECRET from outside the root")
    edit = _zero_values_edit(tiny)
    edit.save(root / "inside.safetensors")
    edit.save(outside / "planted.safetensors")
    (root / "escape.safetensors").symlink_to(outside / "planted.safetensors")
    (root / "escape-dir").symlink_to(outside, target_is_directory=True)
    (root / "report" / "leak.md").symlink_to(outside / "secret.md")
    (root / "report" / "leak.png").symlink_to(outside / "secret.png")
    (tmp_path / "out").mkdir()
    session = preview.PreviewSession(tiny, MODEL, roots=[root], out_dir=tmp_path / "out", cache_size=2)
    return session, root, outside


def _module(name: str):
    """The module itself (``erasekit.erase`` is also the name of a function, so dotted strings mislead)."""
    import importlib

    return importlib.import_module(name)


def _message(fn, *args) -> str:
    with pytest.raises(ErasekitError) as info:
        fn(*args)
    return str(info.value)


def _compare(session, edit_file=None, method="uce", concept="Van Gogh", steps=2, model=MODEL, seed=0, job=""):
    return session.compare(model, edit_file, method, concept, PROMPT, seed, steps, job)


# -- files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("given", ["../../etc/passwd", "/etc/passwd", "../outside/planted.safetensors",
                                   "OUTSIDE/planted.safetensors", "escape.safetensors",
                                   "escape-dir/planted.safetensors", "missing.safetensors",
                                   "ROOT/missing.safetensors", "ROOT/report", "ROOT"])
def test_edit_files_outside_the_roots_are_refused_with_one_message(world, given):
    session, root, outside = world
    given = given.replace("OUTSIDE", str(outside)).replace("ROOT", str(root))
    assert _message(_compare, session, given) == preview.NO_EDIT_FILE
    assert not session.edits


def test_edit_files_inside_the_roots_and_the_launch_edit_are_read(world, tmp_path, tiny):
    session, root, outside = world
    for given in ("inside.safetensors", str(root / "inside.safetensors")):
        *_, status, path = _compare(session, given)
        assert "zero-values" in status and path == str(root / "inside.safetensors")
    launched = preview.PreviewSession(tiny, MODEL, edit=outside / "planted.safetensors",
                                      out_dir=tmp_path / "out")
    assert "zero-values" in _compare(launched, str(outside / "planted.safetensors"))[2]
    assert _message(_compare, launched, str(root / "inside.safetensors")) == preview.NO_EDIT_FILE


@pytest.mark.parametrize("given", ["../../etc", "/etc", "../outside", "OUTSIDE", "escape-dir", "/",
                                   "missing", "ROOT/missing", "report/grid.png", "~", ""])
def test_report_folders_outside_the_roots_are_refused_with_one_message(world, given):
    session, root, outside = world
    given = given.replace("OUTSIDE", str(outside)).replace("ROOT", str(root))
    assert _message(session.report, given) == preview.NO_REPORT


def test_a_report_lists_only_files_inside_the_roots(world):
    session, root, _ = world
    for given in ("report", str(root / "report"), str(root)):
        grids, text = session.report(given)
        names = [name for _, name in grids]
        assert "secret" not in text.lower()
        assert not any("leak" in n or "secret" in n for n in names), names
        assert any(n.endswith("grid.png") for n in names)
    assert session.report("report")[1] == "# the allowed report"


def test_by_default_only_the_output_folder_is_readable(tmp_path, tiny):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "r.md").write_text("text")
    session = preview.PreviewSession(tiny, MODEL)
    assert session.reports.roots == [session.out_dir]
    assert _message(session.report, str(tmp_path / "report")) == preview.NO_REPORT


def test_gradio_serves_the_output_folder_and_blocks_the_roots(world, tmp_path):
    session, root, _ = world
    allowed, blocked = preview.gradio_paths(session, [root])
    assert allowed == [str(session.out_dir)]
    assert str(root.resolve()) in blocked
    assert preview.gradio_paths(session, [tmp_path])[1] == []   # would block the output folder


# -- models, limits ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["DIR", "/", "runwayml/stable-diffusion-v1-5", "../tiny-sd1"])
def test_only_the_offered_models_load(world, tmp_path, monkeypatch, model):
    session, *_ = world

    def never(name, *a, **k):
        raise AssertionError(f"load_pipeline({name!r}) must not be called")

    monkeypatch.setattr(_module("erasekit.pipelines.loading"), "load_pipeline", never)
    message = _message(_compare, session, None, "uce", "Van Gogh", 2, model.replace("DIR", str(tmp_path)))
    assert "is not offered by this preview" in message and "tiny-sd1, canvas-mini" in message
    assert list(session.pipes) == [MODEL]


def test_models_given_at_launch_are_offered(tiny, monkeypatch):
    loaded = []
    monkeypatch.setattr(_module("erasekit.pipelines.loading"), "load_pipeline",
                        lambda name: loaded.append(name) or tiny)
    session = preview.PreviewSession(tiny, MODEL, models=["other"])
    assert session.models == [MODEL, "canvas-mini", "other"]
    with session.job("other"):
        pass
    assert loaded == ["other"]


@pytest.mark.parametrize("steps", [0, -1, 51, 10_000, 2.5, True, None, "5"])
def test_sampling_steps_are_bounded(world, steps):
    session, *_ = world
    assert "steps must be a whole number from 1 to 50" in _message(_compare, session, None, "uce", "Van Gogh", steps)
    assert not session.edits   # refused before any work


@pytest.mark.parametrize("seed", [-1, 2 ** 32, 0.5, None])
def test_seeds_are_checked(world, seed):
    session, *_ = world
    assert "seed must be a whole number" in _message(_compare, session, None, "uce", "Van Gogh", 2, MODEL, seed)


def test_the_steps_asked_for_are_used(world, monkeypatch):
    session, root, _ = world
    seen = []
    unet_forward = session.pipes[MODEL].unet.forward
    monkeypatch.setattr(session.pipes[MODEL].unet, "forward", lambda *a, **k: seen.append(1) or unet_forward(*a, **k))
    _compare(session, "inside.safetensors", steps=3)
    assert len(seen) == 2 * 3   # original and erased, 3 steps each (CFG batches both halves in one call)


def test_the_ui_limits_match_the_session(tiny):
    app = preview.build_app(model=MODEL, pipe=tiny, max_steps=12)
    steps = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == "steps"][0]
    assert (steps.minimum, steps.maximum) == (1, 12) and app.session.max_steps == 12
    assert [b for b in app.blocks.values() if getattr(b, "elem_id", None) == "model"][0].choices == \
        [(MODEL, MODEL), ("canvas-mini", "canvas-mini")]


# -- jobs: one per pipeline, progress, cancel -------------------------------------------------------
def test_pipeline_events_run_one_at_a_time_with_progress_and_a_cancel(tiny):
    app = preview.build_app(model=MODEL, pipe=tiny)
    fns = {fn.name: fn for fn in app.fns.values()}
    pipeline_fns = [fns["on_compare"], fns["on_attack"]]
    assert all(fn.concurrency_limit == 1 and fn.concurrency_id == "pipeline" for fn in pipeline_fns)
    assert all(fn.tracks_progress for fn in pipeline_fns)
    ids = {i for i, fn in app.fns.items() if fn in pipeline_fns}
    assert any(set(fn.cancels) == ids for fn in app.fns.values()), "a Cancel button must cancel both events"


def test_a_second_job_on_a_pipeline_waits_for_the_first(world):
    session, *_ = world
    order, inside = [], threading.Event()

    def first():
        with session.job(MODEL, "a"):
            inside.set()
            order.append("first in")
            threading.Event().wait(0.3)
            order.append("first out")

    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    with session.job(MODEL, "b"):
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"]


def _cancel_after(session, pipe, job, calls):
    """A hook that presses Cancel for ``job`` at the ``calls``-th UNet call (as a visitor would, mid-run)."""
    count, said = [0], []

    def hook(*_):
        count[0] += 1
        if count[0] == calls:
            said.append(session.cancel(job))

    return pipe.unet.register_forward_pre_hook(hook), count, said


def _fine_tune(pipe, method, concepts):
    """Stands in for a long training method: changes a weight in place, calls the UNet for 10,000
    steps, and restores the weight on the way out (as the training engine does)."""
    weight = pipe.unet.conv_in.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(1.0)
            x, t, cond = torch.zeros(1, 4, 8, 8), torch.tensor(1), torch.zeros(1, 77, 32)
            for _ in range(10_000):
                pipe.unet(x, t, cond)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    raise AssertionError("the run was not stopped")


def test_cancel_stops_a_fine_tune_and_restores_the_pipeline(world, tiny, monkeypatch):
    session, *_ = world
    monkeypatch.setattr(_module("erasekit.erase.registry"), "erase", _fine_tune)
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    handle, count, said = _cancel_after(session, tiny, "visitor", calls=5)
    try:
        assert _message(_compare, session, None, "esd", "Van Gogh", 2, MODEL, 0, "visitor").startswith("cancelled")
    finally:
        handle.remove()
    assert said == ["Cancelled."] and count[0] == 5   # the call during which Cancel was pressed did not run
    assert all(torch.equal(before[k], v) for k, v in tiny.unet.state_dict().items())
    assert not session.edits and not tiny.unet._forward_pre_hooks
    assert session.cancel("visitor") == "Nothing to cancel."


def test_cancel_stops_a_real_esd_run_and_the_engine_restores_the_pipeline(world, tiny):
    session, *_ = world
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    handle, count, said = _cancel_after(session, tiny, "visitor", calls=8)
    try:
        assert _message(_compare, session, None, "esd", "Van Gogh", 2, MODEL, 0, "visitor").startswith("cancelled")
    finally:
        handle.remove()
    assert said == ["Cancelled."] and count[0] == 8
    assert all(torch.equal(before[k], v) for k, v in tiny.unet.state_dict().items())


def test_cancel_stops_only_its_own_visitors_job(world, tiny):
    session, root, _ = world
    handle, count, said = _cancel_after(session, tiny, "someone else", calls=1)
    try:
        assert "zero-values" in _compare(session, "inside.safetensors", job="visitor")[2]
    finally:
        handle.remove()
    assert said == ["Nothing to cancel."] and count[0] > 1


def test_a_job_waiting_for_the_pipeline_can_be_cancelled(world):
    session, *_ = world
    inside, release = threading.Event(), threading.Event()

    def first():
        with session.job(MODEL, "a"):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    errors = []
    waiting = threading.Thread(target=lambda: errors.append(_message(session.job(MODEL, "b").__enter__)))
    waiting.start()
    while not session._jobs.get("b"):
        threading.Event().wait(0.01)
    assert session.cancel("b") == "Cancelled."
    release.set()
    t.join()
    waiting.join()
    assert errors == ["cancelled before it started"]


def test_method_runs_report_progress(world, monkeypatch):
    session, *_ = world
    monkeypatch.setattr(_module("erasekit.erase.registry"), "erase",
                        lambda pipe, method, concepts: _zero_values_edit(pipe))
    said = []
    session.compare(MODEL, None, "esd", "Van Gogh", PROMPT, 0, 2, "", lambda *a, **k: said.append(k["desc"]))
    assert said and "esd" in said[0] and "Cancel" in said[0]


# -- cache, download --------------------------------------------------------------------------------
def test_the_edit_cache_keeps_the_last_few(world, monkeypatch):
    session, *_ = world   # cache_size=2
    runs = []

    def fake_erase(pipe, method, concepts):
        runs.append(concepts[0])
        return _zero_values_edit(pipe, concepts[0])

    monkeypatch.setattr(_module("erasekit.erase.registry"), "erase", fake_erase)
    pipe = session.pipes[MODEL]
    paths = {c: session.edit(pipe, MODEL, None, "esd", c)[1] for c in ("A", "B", "C")}
    assert len(session.edits) == 2 and not paths["A"].exists() and paths["C"].exists()
    session.edit(pipe, MODEL, None, "esd", "C")
    session.edit(pipe, MODEL, None, "esd", "A")
    assert runs == ["A", "B", "C", "A"]   # C was cached; A was dropped and made again
    assert len(list(session.out_dir.iterdir())) == 2


def test_download_gives_the_edit_file(world, monkeypatch):
    from erasekit.pipelines import Edit

    session, root, _ = world
    made = []
    monkeypatch.setattr(_module("erasekit.erase.registry"), "erase",
                        lambda pipe, method, concepts: made.append(_zero_values_edit(pipe, concepts[0])) or made[-1])
    *_, path = _compare(session, None, "esd", "Van Gogh")
    assert path and path.endswith(".safetensors")
    loaded = Edit.load(path, pipe=session.pipes[MODEL])
    assert loaded.manifest["concepts"] == ["Van Gogh"] and loaded.keys == made[0].keys
    assert all(torch.equal(loaded.weights[k], made[0].weights[k]) for k in made[0].weights)
    assert Path(path).parent.parent == session.out_dir
    assert _compare(session, "inside.safetensors")[3] == str(root / "inside.safetensors")


# -- SD 3 / Flux ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd3(clip_tokenizer_dir):
    """One tiny SD 3 pipeline for the module: every test leaves its weights as they were."""
    from conftest import build_tiny_mmdit

    return build_tiny_mmdit("sd3", clip_tokenizer_dir)


def _weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(before: dict, module) -> bool:
    return all(torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_compare_samples_an_mmdit_pipeline_with_flow_euler_at_the_steps_asked_for(family, tiny_sd3, clip_tokenizer_dir,
                                                                                  tmp_path):
    from conftest import build_tiny_mmdit

    pipe = tiny_sd3 if family == "sd3" else build_tiny_mmdit("flux", clip_tokenizer_dir)
    session = preview.PreviewSession(pipe, family, out_dir=tmp_path)
    before, calls = _weights(pipe.transformer), []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        original, erased, status, path = _compare(session, None, "uce", "Van Gogh", 3, family)
    finally:
        handle.remove()
    assert "**uce** erased Van Gogh" in status and "3 flow_euler steps" in status
    assert Path(path).exists() and path.endswith(".safetensors")
    assert original.size == erased.size and original.tobytes() != erased.tobytes()   # the concept's context moved
    per_image = 3   # SD 3: classifier-free guidance batches both halves in one call; Flux: one conditional pass
    assert len(calls) == 2 * per_image   # original and erased, one transformer call per step each
    assert _same(before, pipe.transformer), "the preview left the transformer changed"


def test_an_mmdit_attack_runs_unlearndiffatk_and_counts_denoiser_evaluations(tiny_sd3, tmp_path):
    from erasekit.eval.judges import Judge

    class NeverSeen(Judge):
        """Never sees the concept, so every round of the attack runs."""

        name, heads = "never", {"style": ["other", "Van Gogh"]}

        def __init__(self):
            self.images = 0

        def classify(self, images):
            self.images += len(images)
            return {"style": torch.zeros(len(images), dtype=torch.long).numpy()}

    judge = NeverSeen()
    session = preview.PreviewSession(tiny_sd3, "sd3", judge, out_dir=tmp_path)
    before = _weights(tiny_sd3.transformer)
    adv, image, status = session.attack("sd3", None, "uce", "Van Gogh", PROMPT, 0, 2, steps_per_block=2, blocks=1,
                                        block_growth=1.0, restarts=1)
    assert adv.endswith(PROMPT) and adv != PROMPT and image.size[0] >= preview.DISPLAY_SIZE
    assert status.startswith("unlearndiffatk: the concept stayed erased") and "denoiser evaluations" in status
    assert "UNet" not in status and judge.images >= 2
    assert _same(before, tiny_sd3.transformer), "the attack left the transformer changed"


def test_cancel_stops_an_esd_run_on_an_mmdit_at_a_transformer_call(tiny_sd3, tmp_path):
    session = preview.PreviewSession(tiny_sd3, "sd3", out_dir=tmp_path)
    before, count, said = _weights(tiny_sd3.transformer), [0], []

    def hook(*_):
        count[0] += 1
        if count[0] == 6:
            said.append(session.cancel("visitor"))

    handle = tiny_sd3.transformer.register_forward_pre_hook(hook)
    try:
        message = _message(_compare, session, None, "esd", "Van Gogh", 2, "sd3", 0, "visitor")
    finally:
        handle.remove()
    assert message.startswith("cancelled") and said == ["Cancelled."] and count[0] == 6
    assert _same(before, tiny_sd3.transformer) and not session.edits
    assert not tiny_sd3.transformer._forward_pre_hooks


def test_a_pipeline_without_components_is_cancelled_at_its_denoiser(tiny_sd3):
    class Bare:   # what a caller may hand over: a transformer, no ``components``
        transformer = tiny_sd3.transformer

    cancel = threading.Event()
    with preview._cancellable(Bare(), cancel):
        assert len(tiny_sd3.transformer._forward_pre_hooks) == 1
        cancel.set()
        with pytest.raises(preview.Cancelled):
            tiny_sd3.transformer(torch.zeros(1, 4, 8, 8))   # stopped before its forward runs
    assert not tiny_sd3.transformer._forward_pre_hooks


# -- errors -----------------------------------------------------------------------------------------
def test_unexpected_errors_reach_the_ui_with_their_message(caplog):
    import gradio as gr

    def broken(*_):
        raise RuntimeError("the disk quota of /srv is exceeded")

    with caplog.at_level(logging.ERROR, logger="erasekit.preview.app"), pytest.raises(gr.Error) as info:
        preview._guard(broken)()
    assert "RuntimeError" in info.value.message and "the disk quota of /srv is exceeded" in info.value.message
    assert any(r.exc_info and "disk quota" in str(r.exc_info[1]) for r in caplog.records), "traceback not logged"


def test_erasekit_errors_reach_the_ui_as_one_line(world):
    import gradio as gr

    session, *_ = world
    with pytest.raises(gr.Error) as info:
        preview._guard(session.compare)(MODEL, None, "no-such-method", "Van Gogh", PROMPT, 0, 2)
    assert info.value.message.startswith("unknown method 'no-such-method'") and "\n" not in info.value.message
    with pytest.raises(gr.Error) as info:
        preview._guard(session.compare)(MODEL, None, "uce", "", PROMPT, 0, 2)
    assert "concepts must be a non-empty list" in info.value.message


def test_a_job_error_leaves_the_pipeline_usable(world, monkeypatch):
    session, *_ = world

    def broken(pipe, method, concepts):
        raise ConfigError("bad option")

    monkeypatch.setattr(_module("erasekit.erase.registry"), "erase", broken)
    assert _message(_compare, session, None, "esd") == "bad option"
    assert not session.pipes[MODEL].unet._forward_pre_hooks
    assert "zero-values" in _compare(session, "inside.safetensors")[2]


def test_the_cli_passes_models_and_roots_to_the_app(monkeypatch, tmp_path):
    from erasekit.cli.main import main

    seen = {}
    monkeypatch.setattr(preview, "launch", lambda **kw: seen.update(kw))
    assert main(["preview", "--model", "canvas-mini", "--model", "./my-sd15", "--allow-root", str(tmp_path),
                 "--allow-root", "runs", "--port", "8123"]) == 0
    assert (seen["model"], seen["models"], seen["roots"], seen["port"]) == \
        ("canvas-mini", ["./my-sd15"], [str(tmp_path), "runs"], 8123)
    assert main(["preview"]) == 0
    assert (seen["model"], seen["models"], seen["roots"]) == ("canvas-mini", [], [])

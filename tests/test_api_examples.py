"""The top-level API's examples run on canvas-mini: the docstring examples (doctest) of
``load_pipeline``, ``generate``, ``erase``, the methods, ``attack`` and ``evaluate``, and the
``Edit`` life cycle (save, load, apply, remove, applied) as a tested example."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

from conftest import CANVAS

pytestmark = pytest.mark.skipif(not (CANVAS / "model_index.json").exists(), reason="erasekit/assets/canvas-mini is not built")

FAST = ["erasekit.pipelines.loading", "erasekit.pipelines.generation", "erasekit.erase.registry",
        "erasekit.erase.uce"]
# RECE's example validates two epochs with the judge; the others run an attack / an evaluation protocol.
SLOW = ["erasekit.erase.rece", "erasekit.attacks", "erasekit.eval.evaluation"]


def _run_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see above)"


@pytest.mark.parametrize("name", FAST)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    _run_doctests(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_docstring_examples_slow(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run_doctests(name)


def test_top_level_names_resolve():
    import erasekit

    for name in ("load_pipeline", "erase", "Edit", "attack", "evaluate", "generate", "methods"):
        assert callable(getattr(erasekit, name)), name
        assert (getattr(erasekit, name).__doc__ or "").strip(), f"erasekit.{name} has no docstring"


def test_edit_life_cycle_example(canvas_pipe, tmp_path):
    """Example: erase, save, load onto the pipeline, apply/remove or use as a context manager."""
    import erasekit
    from erasekit.pipelines import generate

    pipe = canvas_pipe
    prompt = "A Cats image in Van Gogh style."
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "attn2.to_" in k}
    original = generate(pipe, prompt, seeds=0)[0]

    edit = erasekit.erase(pipe, "rece", ["Van Gogh"])
    path = edit.save(tmp_path / "van_gogh.safetensors")
    loaded = erasekit.Edit.load(path, pipe=pipe)          # refuses a file made for another model
    assert loaded.manifest["method"] == "rece" and loaded.keys == edit.keys

    loaded.apply(pipe)                                    # in place
    erased = generate(pipe, prompt, seeds=0)[0]
    loaded.remove(pipe)                                   # exactly the weights before
    with loaded.applied(pipe):                            # or only inside a block
        again = generate(pipe, prompt, seeds=0)[0]

    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert erased.tobytes() != original.tobytes()
    assert again.tobytes() == erased.tobytes()

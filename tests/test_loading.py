"""load_pipeline and generation: clear errors, offline, reproducible."""

import pytest

from erasekit.errors import ModelLoadError
from erasekit.pipelines import Sampling, generate, load_pipeline


def test_unknown_name(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_pipeline("not a model name")


def test_path_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(tmp_path)


def test_hub_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="local directory"):
        load_pipeline("nobody-here/no-such-model")


def test_saved_pipeline_round_trip(tiny_sd1, tmp_path):
    tiny_sd1.save_pretrained(tmp_path / "p")
    pipe = load_pipeline(tmp_path / "p")
    a = generate(pipe, "a cat", [3], Sampling(steps=2))[0]
    b = generate(tiny_sd1, "a cat", [3], Sampling(steps=2))[0]
    assert a.tobytes() == b.tobytes()


def test_generation_reproducible_and_seed_dependent(tiny_pipe):
    s = Sampling(steps=3, batch_size=2)
    a = generate(tiny_pipe, ["a cat", "a dog", "a cat"], [0, 0, 1], s)
    b = generate(tiny_pipe, ["a cat", "a dog", "a cat"], [0, 0, 1], s)
    assert [x.tobytes() for x in a] == [x.tobytes() for x in b]
    assert a[0].tobytes() != a[2].tobytes()

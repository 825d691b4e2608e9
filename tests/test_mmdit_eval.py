"""Evaluation, the eval/attack CLI and the MMDiT benchmark's plumbing on tiny random SD 3 and Flux pipelines.

Protocols name a DDPM sampler (``ddim``); on a flow-matching pipeline evaluation samples them with
``flow_euler`` at the protocol's steps and guidance, and the report records the sampler it used.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import erasekit
from erasekit.errors import ConfigError
from erasekit.eval.judges import Judge
from erasekit.eval.protocol import Protocol, for_pipeline
from erasekit.pipelines import Sampling, generate

ROWS = [("a cat", 3, 5.0), ("Van Gogh", 0, 4.0), ("a painting by Van Gogh", 7, 5.0)]


class RecordingJudge(Judge):
    """Sees ``bright`` when an image's mean pixel exceeds the threshold; keeps every image it is shown."""

    name = "recording"
    heads = {"tone": ["dark", "bright"]}

    def __init__(self, threshold: float = 127.0):
        self.threshold, self.seen = threshold, []

    def classify(self, images):
        self.seen += [np.asarray(im).copy() for im in images]
        return {"tone": np.array([int(np.asarray(im).mean() > self.threshold) for im in images])}


def _csv(tmp_path, rows=ROWS):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,seed,guidance\n" + "".join(f'"{p}",{s},{g}\n' for p, s, g in rows))
    return path


def _protocol(tmp_path) -> Protocol:
    return Protocol.from_csv(_csv(tmp_path), name="tiny-prompts", model="tiny",
                             sampling=Sampling("ddim", 2, 7.5, batch_size=2))


def _uint8(image) -> np.ndarray:
    return (np.asarray(image, dtype=np.float32).clip(0, 1) * 255).round().astype(np.uint8)


def _state(pipe) -> dict:
    return {f"{n}/{k}": v.detach().clone() for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)
            for k, v in m.state_dict().items()}


def _evaluate(pipe, edit, protocol, judge):
    return erasekit.evaluate(pipe, edit, protocol, targets=["bright"], judge=judge, fid=False, clip=False,
                             cache_dir=None, progress=False)


def test_evaluate_samples_a_ddim_protocol_with_flow_euler_and_records_it(tiny_mmdit, tmp_path):
    protocol = _protocol(tmp_path)
    edit = erasekit.erase(tiny_mmdit, "uce", ["Van Gogh"], guide="a painting", templates=["{}"])
    before = _state(tiny_mmdit)
    judge = RecordingJudge()
    report = _evaluate(tiny_mmdit, edit, protocol, judge)
    sampling = report.protocol["sampling"]
    assert sampling["sampler"] == "flow_euler" and sampling["steps"] == 2 and sampling["guidance"] == 7.5
    assert report.protocol["prompt_guidance"] == [5.0, 4.0, 5.0] and report.model["dtype"] == "float32"
    assert any("'ddim'" in n and "'flow_euler'" in n for n in report.notes)
    assert report.scores["n_images"] == report.baseline["n_images"] == 3
    assert report.method == "uce" and report.targets == ["bright"]
    assert _state(tiny_mmdit).keys() == before.keys() and all(
        torch.equal(v, before[k]) for k, v in _state(tiny_mmdit).items())   # the Edit is removed afterwards
    edited, base = judge.seen[:3], judge.seen[3:]   # the edited model's images are made first
    # the original model's images are the pipeline's own flow-Euler samples at each row's seed and guidance
    for (prompt, seed, guidance), image in zip(ROWS, base):
        made = generate(tiny_mmdit, prompt, seed, Sampling("flow_euler", 2, guidance, batch_size=2),
                        output_type="np")[0]
        np.testing.assert_array_equal(image, _uint8(made))
    with edit.applied(tiny_mmdit):
        made = generate(tiny_mmdit, ROWS[1][0], ROWS[1][1], Sampling("flow_euler", 2, ROWS[1][2]), output_type="np")
    np.testing.assert_array_equal(edited[1], _uint8(made[0]))   # the edited images are the Edit's
    assert not np.array_equal(edited[1], base[1])


def test_evaluation_is_reproducible_with_the_same_seeds(tiny_mmdit, tmp_path):
    protocol = _protocol(tmp_path)
    first, second = RecordingJudge(), RecordingJudge()
    a = _evaluate(tiny_mmdit, None, protocol, first)
    b = _evaluate(tiny_mmdit, None, protocol, second)
    assert a.scores == b.scores and len(first.seen) == 3
    assert all(np.array_equal(x, y) for x, y in zip(first.seen, second.seen))
    assert not np.array_equal(first.seen[0], first.seen[2])   # other prompts and seeds, other images


def test_the_cache_key_reads_the_transformer(tiny_mmdit):
    from erasekit.eval.runner import pipeline_hash

    before = pipeline_hash(tiny_mmdit)
    with torch.no_grad():
        tiny_mmdit.transformer.proj_out.weight.mul_(2)
    assert pipeline_hash(tiny_mmdit) != before   # another transformer: the original's cached records do not apply


def test_a_flow_sampler_on_a_ddpm_model_is_refused(tiny_sd1, tmp_path):
    protocol = _protocol(tmp_path)
    assert for_pipeline(protocol, tiny_sd1) == (protocol, None)   # a DDPM model keeps the protocol's sampler
    flow = protocol.with_(sampling=Sampling("flow_euler", 2))
    with pytest.raises(ConfigError, match="DDPM scheduler"):
        erasekit.evaluate(tiny_sd1, None, flow, targets=["bright"], judge=RecordingJudge(), fid=False, clip=False,
                          cache_dir=None, progress=False)


# -- the command line on a saved SD 3 folder ---------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_sd3(tmp_path_factory, clip_tokenizer_dir):
    from conftest import build_tiny_mmdit

    path = tmp_path_factory.mktemp("mmdit-eval") / "sd3"
    build_tiny_mmdit("sd3", clip_tokenizer_dir).save_pretrained(path)
    return path


class NudityStub(RecordingJudge):
    """A judge with NudeNet's head (``nudity``), seeing it in bright images: no detector needed."""

    name = "nudity-stub"
    heads = {"nudity": ["safe", "nudity"]}

    def classify(self, images):
        return {"nudity": super().classify(images)["tone"]}


def test_cli_erase_then_eval_on_a_saved_sd3_folder(saved_sd3, tmp_path, monkeypatch, capsys):
    from erasekit.cli import commands
    from erasekit.cli.main import EXIT_OK, main

    edit = tmp_path / "uce.safetensors"
    assert main(["erase", "--model", str(saved_sd3), "--method", "uce", "--concept", "Van Gogh",
                 "--out", str(edit)]) == EXIT_OK, capsys.readouterr().err
    judge = NudityStub()
    monkeypatch.setattr(commands, "load_judge", lambda name: judge)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))   # the original model's records: made here
    monkeypatch.setattr("erasekit.eval.protocol.NUDITY_SAMPLING", Sampling("ddim", 2, 7.5, batch_size=4))
    capsys.readouterr()
    code = main(["--json", "eval", "--model", str(saved_sd3), "--edit", str(edit), "--protocol", "nudity",
                 "--prompts", str(_csv(tmp_path)), "--out", str(tmp_path / "report")])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["protocol"]["sampling"]["sampler"] == "flow_euler" and saved["protocol"]["sampling"]["steps"] == 2
    assert saved["method"] == "uce" and saved["targets"] == ["nudity"] and saved["scores"]["n_images"] == 3
    assert saved["baseline"]["n_images"] == 3 and len(judge.seen) == 6
    assert any("'ddim'" in n and "'flow_euler'" in n for n in saved["notes"])   # the report says why


def test_cli_attack_on_a_saved_sd3_folder(saved_sd3, tmp_path, monkeypatch, capsys):
    from _attack_helpers import ToneJudge

    from erasekit.cli import commands
    from erasekit.cli.main import EXIT_OK, main

    monkeypatch.setattr(commands, "load_judge", lambda name: ToneJudge(255))   # never bright: every round runs
    code = main(["--json", "attack", "--model", str(saved_sd3), "--prompt", "a cat", "--concept", "bright",
                 "--attack", "unlearndiffatk", "-o", "steps_per_block=2", "-o", "blocks=1", "-o", "restarts=1",
                 "--out", str(tmp_path / "udatk")])
    assert code == EXIT_OK, capsys.readouterr().err
    data = json.loads(capsys.readouterr().out)
    res = json.loads((tmp_path / "udatk" / "attack.json").read_text())
    assert data["n"] == 1 and res["protocol"]["sampling"]["sampler"] == "flow_euler"
    assert res["prompts"][0]["grad_steps"] == 2 and not res["prompts"][0]["success"]   # one block of Adam steps
    judge = NudityStub(threshold=255)
    monkeypatch.setattr(commands, "load_judge", lambda name: judge)
    monkeypatch.setattr("erasekit.eval.protocol.NUDITY_SAMPLING", Sampling("ddim", 2, 7.5, batch_size=4))
    code = main(["--json", "attack", "--model", str(saved_sd3), "--protocol", "nudity", "--prompts",
                 str(_csv(tmp_path)), "--attack", "none", "--out", str(tmp_path / "none")])
    assert code == EXIT_OK, capsys.readouterr().err
    res = json.loads((tmp_path / "none" / "attack.json").read_text())
    assert res["protocol"]["sampling"]["sampler"] == "flow_euler" and len(judge.seen) == 3


def test_cli_erase_on_a_saved_flux_folder(tmp_path, clip_tokenizer_dir, capsys):
    """The documented command (`erasekit erase --model DIR --method uce --concept ...`) on a Flux folder."""
    from conftest import build_tiny_mmdit

    from erasekit.cli.main import EXIT_OK, main
    from erasekit.pipelines import Edit, load_pipeline

    folder, edit_path = tmp_path / "flux", tmp_path / "uce.safetensors"
    build_tiny_mmdit("flux", clip_tokenizer_dir).save_pretrained(folder)
    assert main(["erase", "--model", str(folder), "--method", "uce", "--concept", "Van Gogh",
                 "--out", str(edit_path)]) == EXIT_OK, capsys.readouterr().err
    pipe = load_pipeline(str(folder))
    edit = Edit.load(edit_path, pipe)
    assert edit.manifest["method"] == "uce" and edit.manifest["family"] == "flux"
    # the exact closed form: the context embedder and the pooled text projection, nothing else
    assert sorted(edit.keys) == ["transformer/context_embedder.weight",
                                 "transformer/time_text_embed.text_embedder.linear_1.weight"]


# -- benchmarks/bench_mmdit.py: its plumbing on tiny configs, its memory check on the full-size ones -------
def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mmdit.py"
    spec = importlib.util.spec_from_file_location("bench_mmdit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_mmdit_times_one_erasure_on_the_tiny_architecture(tmp_path):
    bench = _bench()
    out = tmp_path / "bench.json"
    report = bench.main(["--tiny", "--family", "sd3", "--methods", "uce,esd-x", "--in-process", "--threads", "1",
                         "--dtype", "float32", "--resolution", "16", "--steps", "1", "--sample-steps", "2",
                         "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    assert report["protocol"]["family"] == "sd3" and report["protocol"]["architecture"] == "tiny"
    for method in ("uce", "esd-x"):
        res = report["results"][method]
        assert "failed" not in res and res["wall_time_s"] > 0 and res["peak_memory_bytes"] > 0, res
        assert res["resolution"] == 16 and res["edit_tensors"] > 0 and res["trained_or_edited"] == ["transformer"]
    assert report["results"]["esd-x"]["options"]["param_set"] == "esd-x"


def test_bench_mmdit_refuses_a_model_larger_than_the_memory_before_building_it(tmp_path, monkeypatch):
    bench = _bench()
    counts = bench.parameter_counts("flux", "full")   # counted on the meta device: no memory
    assert abs(counts["transformer"] / 1e9 - 11.90) < 0.01 and abs(counts["text_encoder_2"] / 1e9 - 4.76) < 0.01
    need = bench.estimate_bytes(counts, "bfloat16")
    assert need["weights"] > 24 * 2**30   # FLUX.1-dev in bf16 cannot be built on a 24 GiB machine
    monkeypatch.setattr(bench, "available_bytes", lambda device: 24 * 2**30)
    monkeypatch.setattr(bench, "run_method", lambda *a: pytest.fail("built a model that does not fit"))
    monkeypatch.setattr(bench, "parameter_counts", lambda family, size: counts)
    report = bench.main(["--family", "flux", "--methods", "uce,esd-x", "--device", "cpu", "--dtype", "bfloat16",
                         "--in-process", "--out", str(tmp_path / "flux.json")])
    for method in ("uce", "esd-x"):
        assert "needs at least" in report["results"][method]["not_run"] and "24.0 GiB is available" in \
            report["results"][method]["not_run"]

"""The nudity protocol: a prompt CSV in the I2P format (either column spelling), one image per row at
the row's seed and guidance, scored with NudeNet, with the classes and threshold in the report.

The model is a painter (a stand-in for a diffusion model) that paints the drawn figure NudeNet flags
for one neutral prompt of the fixture and a gradient for the others, and records the seed and
guidance of every image it makes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from erasekit.errors import ConfigError
from erasekit.eval.protocol import get_protocol, nudity_protocol, read_prompt_csv

FIXTURE = Path(__file__).parent / "data" / "neutral_prompts.csv"
FIGURE_PROMPT = "a marble sculpture in a garden"   # the painter's one figure (a stand-in, not a nude prompt)


def _write(tmp_path, text: str, name: str = "p.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_i2p_and_plain_column_spellings(tmp_path):
    i2p = read_prompt_csv(FIXTURE)
    assert i2p.prompts[2] == "a bowl of oranges, on a wooden table"   # a quoted comma stays in the prompt
    assert i2p.seeds == (42, 7, 4261553411, 0) and i2p.guidance == (7.0, 7.5, 9.0, 7.0)
    assert i2p.columns == {"prompt": "prompt", "seed": "sd_seed", "guidance": "sd_guidance_scale"}
    plain = read_prompt_csv(_write(tmp_path, "prompt,seed,guidance\na cat,3,5\na dog,4.0,12.5\n"))
    assert (plain.prompts, plain.seeds, plain.guidance) == (("a cat", "a dog"), (3, 4), (5.0, 12.5))
    mu = read_prompt_csv(_write(tmp_path, "case_number,prompt,evaluation_seed,evaluation_guidance\n0,a cat,9,7\n"))
    assert (mu.seeds, mu.guidance, mu.columns["seed"]) == ((9,), (7.0,), "evaluation_seed")
    no_guidance = read_prompt_csv(_write(tmp_path, "prompt,seed\na cat,1\n"))
    assert no_guidance.guidance == () and "guidance" not in no_guidance.columns


@pytest.mark.parametrize("text, match", [
    ("text,seed\na cat,1\n", "no prompt column: name one of prompt"),
    ("prompt,guidance\na cat,7\n", "no seed column: name one of seed, sd_seed, evaluation_seed"),
    ("prompt,seed\na cat,1\na dog,x\n", "line 3: seed 'x' in column 'seed' is not a non-negative integer"),
    ("prompt,seed\na cat,-2\n", "line 2: seed '-2'"),
    ("prompt,seed\na cat,1.5\n", "line 2: seed '1.5'"),
    ("prompt,seed,guidance\na cat,1,nan\n", "line 2: guidance 'nan' in column 'guidance' is not a positive number"),
    ("prompt,seed\n,1\n", "line 2: the 'prompt' column is empty"),
    ("prompt,seed\n", "has a header but no rows"),
])
def test_bad_files_name_the_problem(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        read_prompt_csv(_write(tmp_path, text))


def test_protocol_items_carry_each_rows_seed_and_guidance():
    protocol = get_protocol("nudity", prompts=FIXTURE)
    items = protocol.items()
    assert [(it.index, it.seed, it.guidance) for it in items] == [(0, 42, 7.0), (1, 7, 7.5), (2, 4261553411, 9.0),
                                                                 (3, 0, 7.0)]
    assert len(protocol) == 4 and protocol.targets == ("nudity",) and "sha256" in protocol.source
    from erasekit.eval.protocol import Protocol

    assert Protocol.from_dict(json.loads(json.dumps(protocol.to_dict()))) == protocol
    with pytest.raises(ConfigError, match="pass prompts='i2p.csv'"):
        get_protocol("nudity")
    with pytest.raises(ConfigError, match="goes with protocol='nudity'"):
        get_protocol("canvas-lite", prompts=FIXTURE)


class FigurePainter:
    """Paints NudeNet's drawn figure for ``FIGURE_PROMPT`` and a gradient otherwise; records every
    (prompt, seed, guidance) it is asked for."""

    def __init__(self):
        import torch
        from _eval_helpers import _Weights

        self.unet, self.calls = _Weights(1.0), []
        self.unet.device = torch.device("cpu")   # attack() measures memory on the UNet's device

    def erasekit_generate(self, prompts, seeds, sampling, progress=False, output_type="np"):
        from test_nudenet import _figure, _nothing

        figure = np.asarray(_figure(), dtype=np.float32) / 255
        gradient = np.asarray(_nothing()[0].resize((320, 320)), dtype=np.float32) / 255
        self.calls += [(p, int(s), sampling.guidance) for p, s in zip(prompts, seeds)]
        return [figure if p == FIGURE_PROMPT else gradient for p in prompts]


def test_nudity_protocol_scores_the_fixture_and_records_the_judge(tmp_path):
    pytest.importorskip("nudenet", reason="nudenet is not installed: pip install 'nudenet==3.4.2'")
    from erasekit.eval import evaluate

    painter = FigurePainter()
    report = evaluate(painter, protocol=nudity_protocol(FIXTURE), fid=False, clip=False, cache_dir=None,
                      progress=False, out_dir=tmp_path)
    assert report.targets == ["nudity"] and report.scores["rate"] == 25.0 and report.scores["n_images"] == 4
    assert sorted(painter.calls) == sorted([("a marble sculpture in a garden", 42, 7.0),
                                            ("a red bicycle leaning on a brick wall", 7, 7.5),
                                            ("a bowl of oranges, on a wooden table", 4261553411, 9.0),
                                            ("a lighthouse on a rocky coast at dawn", 0, 7.0)])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["judge"]["name"] == "nudenet" and saved["judge"]["threshold"] == 0.6
    assert len(saved["judge"]["classes"]) == 9 and "320n" in saved["judge"]["detector"]
    assert saved["protocol"]["prompt_guidance"] == [7.0, 7.5, 9.0, 7.0] and "sha256" in saved["protocol"]["source"]


def test_cli_eval_and_attack_on_the_fixture(tmp_path, monkeypatch, capsys):
    pytest.importorskip("nudenet", reason="nudenet is not installed: pip install 'nudenet==3.4.2'")
    from erasekit.cli import commands
    from erasekit.cli.main import main

    painter = FigurePainter()
    monkeypatch.setattr(commands, "_load_pipe", lambda args, out, manifest=None: (painter, "painter"))
    rc = main(["--json", "eval", "--protocol", "nudity", "--prompts", str(FIXTURE), "--judge", "nudenet:0.5",
               "--out", str(tmp_path / "rep")])
    assert rc == 0
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["judge"]["threshold"] == 0.5 and saved["scores"]["rate"] == 25.0
    capsys.readouterr()
    rc = main(["--json", "attack", "--protocol", "nudity", "--prompts", str(FIXTURE), "--attack", "none",
               "--out", str(tmp_path / "att")])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["asr"] == 25.0 and data["n"] == 4 and data["judge"]["threshold"] == 0.6
    res = json.loads((tmp_path / "att" / "attack.json").read_text())
    assert [p["seed"] for p in res["prompts"]] == [42, 7, 4261553411, 0]   # file order kept across guidance runs
    assert res["protocol"]["prompt_guidance"] == [7.0, 7.5, 9.0, 7.0]
    assert res["protocol"]["sampling"]["guidance"] is None   # the rows differ: each row's is in prompt_guidance
    assert [p["success"] for p in res["prompts"]] == [True, False, False, False]
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,guidance\na cat,7\n")
    loads = []
    monkeypatch.setattr(commands, "_load_pipe", lambda *a, **k: loads.append(1))
    assert main(["eval", "--protocol", "nudity", "--prompts", str(bad), "--out", str(tmp_path / "r2")]) == 2
    assert "no seed column" in capsys.readouterr().err and not loads   # refused before any model is loaded

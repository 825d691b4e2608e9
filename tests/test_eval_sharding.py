"""Evaluation sharded over two CPU processes (torchrun, gloo) merges to the one-process result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


# Three processes start torch, diffusers and open_clip: about 30 s of CPU, kept in the default suite
# because the sharded evaluation is only trustworthy if this holds.
def test_two_processes_give_the_one_process_counts(tmp_path, clip_tokenizer_dir):
    from _eval_shard_worker import run

    one = run(str(tmp_path / "one"), str(clip_tokenizer_dir)).to_dict()
    worker = Path(__file__).resolve().parent / "_eval_shard_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           str(worker), str(tmp_path / "two"), str(clip_tokenizer_dir)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["environment"]["processes"] == 2 and one["environment"]["processes"] == 1
    for key in ("scores", "baseline"):
        a, b = one[key], two[key]
        assert a["n_images"] == b["n_images"] == 20
        assert 0 < a["mean_style_accuracy"] < 100  # the parity judge's labels vary, so equality means something
        assert a["style_accuracy"] == b["style_accuracy"] and a["object_accuracy"] == b["object_accuracy"]
        assert a["targets"] == b["targets"]
        assert b["fid"]["fid"] == pytest.approx(a["fid"]["fid"], rel=1e-6)
        assert b["clip"]["retained"] == pytest.approx(a["clip"]["retained"], rel=1e-6)
    assert two["scores"]["fid"]["fid_vs_original"] == pytest.approx(one["scores"]["fid"]["fid_vs_original"], rel=1e-6)

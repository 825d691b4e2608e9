"""Worker of the sharded-evaluation test: ``python -m torch.distributed.run --nproc_per_node N
_eval_shard_worker.py OUT TOK``, or run in-process through :func:`run`.

Every process builds the same tiny sd1 pipeline and a random-weight canvas-architecture CLIP,
evaluates the tiny protocol (judge: pixel-sum parity, so equal counts mean equal pixels) with an Edit, and the main process writes
the report to ``OUT/report.json``.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(out: str, tokenizer_dir: str):
    import open_clip
    from conftest import build_tiny

    from _eval_helpers import ParityJudge, tiny_protocol
    from erasekit.canvas.clip import MEAN, STD, build_clip
    from erasekit.eval import evaluate
    from erasekit.eval.clip_score import ClipEncoder
    from erasekit.pipelines import Edit

    torch.set_num_threads(1)
    pipe = build_tiny("sd1", Path(tokenizer_dir))
    torch.manual_seed(0)
    clip = ClipEncoder(build_clip().eval(), open_clip.tokenize, image_size=32, mean=MEAN, std=STD, name="random")
    key = "unet/down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    edit = Edit.from_weights(pipe, {key: pipe.unet.get_parameter(key.split("/", 1)[1]) * -2.0},
                             {"method": "flip", "concepts": ["Mosaic"]})
    # batch_size 1: each image is computed alone, so its pixels do not depend on the sharding
    return evaluate(pipe, edit, protocol=tiny_protocol(seeds=(0, 1, 2, 3, 4), batch_size=1), judge=ParityJudge(),
                    fid=clip, clip=clip, cache_dir=None, progress=False, out_dir=out)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])

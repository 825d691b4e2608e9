"""Worker for the two-process test: ``python -m torch.distributed.run --nproc_per_node 2 _ddp_worker.py OUT TOK``.

Each rank builds the same tiny sd1 pipeline, trains ESD-x for a few steps through the engine
(gloo on CPU, set up by accelerate from torchrun's environment) and writes its final weights and
the loss of its own first sample to ``OUT/rank<r>.safetensors``.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(out: str, tokenizer_dir: str) -> None:
    from conftest import build_tiny

    from erasekit.erase.engine import TrainConfig, Trainer
    from erasekit.erase.param_sets import select_params
    from erasekit.pipelines import FamilyAdapter

    torch.set_num_threads(1)
    pipe = build_tiny("sd1", Path(tokenizer_dir))
    ctx = FamilyAdapter(pipe).encode(["a photo of a cat", ""])
    first = {}

    with Trainer(pipe, select_params(pipe, "esd-x"), TrainConfig(steps=3, lr=1e-2, progress=False)) as tr:
        def loss_fn(i):
            x = torch.randn(1, 4, 8, 8, generator=tr.rng)
            t = torch.randint(0, 1000, (1,), generator=tr.rng)
            target = tr.frozen(pipe.unet, x, t, **ctx[1:2].unet_kwargs(pipe)).sample
            loss = torch.nn.functional.mse_loss(pipe.unet(x, t, **ctx[0:1].unet_kwargs(pipe)).sample, target)
            first.setdefault("loss", float(loss.detach()))
            return loss

        edit = tr.fit(loss_fn)
        rank, world = tr.rank, tr.world
    from erasekit._io import save_tensors

    save_tensors(Path(out) / f"rank{rank}.safetensors", edit.weights,
                 {"world": world, "first_loss": first["loss"]})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

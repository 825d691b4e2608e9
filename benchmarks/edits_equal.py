"""Do two versions of erasekit make the same Edits on canvas-mini? (A refactoring check.)

``dump SRC OUT`` imports erasekit from the checkout ``SRC`` (e.g. a ``git worktree`` of an older
commit), erases a style and an object with every method at a small budget (the budget is given, so
both versions train the same number of steps; every other option is the version's default) and writes
each Edit's dense new weights to ``OUT/<method>_<concept>.safetensors``. ``compare A B`` says, per file,
whether the two dumps are bitwise equal. Equal Edits make equal images, so every figure measured with
one version holds for the other::

    git worktree add /tmp/old <commit>
    python benchmarks/edits_equal.py dump /tmp/old /tmp/dump_old
    python benchmarks/edits_equal.py dump . /tmp/dump_new
    python benchmarks/edits_equal.py compare /tmp/dump_old /tmp/dump_new
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONCEPTS = ("Van_Gogh", "Cats")
BUDGETS = {"uce": {}, "rece": {}, "esd": {"steps": 3}, "salun": {"steps": 2}, "advunlearn": {"steps": 2},
           "sfd": {"iterations": 2, "distill_iterations": 2}}


def dump(src: str, out: str) -> None:
    sys.path.insert(0, str(Path(src).resolve()))
    import torch

    import erasekit
    from safetensors.torch import save_file

    assert Path(erasekit.__file__).resolve().is_relative_to(Path(src).resolve()), erasekit.__file__
    torch.set_num_threads(1)
    Path(out).mkdir(parents=True, exist_ok=True)
    pipe = erasekit.load_pipeline("canvas-mini")
    for concept in CONCEPTS:
        for method, budget in BUDGETS.items():
            if method == "sfd" and concept != CONCEPTS[0]:
                continue   # the slowest; one concept shows its path
            edit = erasekit.erase(pipe, method, [concept], **budget)
            dense = dict(edit.weights)
            for key, (u, v) in edit.deltas.items():
                dense[key] = (u.double() @ v.double()).float()
            save_file({k: t.contiguous() for k, t in dense.items()}, f"{out}/{method}_{concept}.safetensors")
            print(method, concept, len(dense), "tensors", flush=True)


def compare(a: str, b: str) -> int:
    import torch
    from safetensors.torch import load_file

    different = 0
    for fa in sorted(Path(a).glob("*.safetensors")):
        fb = Path(b) / fa.name
        if not fb.exists():
            print(fa.name, "missing in", b)
            different += 1
            continue
        ta, tb = load_file(fa), load_file(fb)
        same = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        different += not same
        print(fa.name, len(ta), "tensors", "bitwise equal" if same else "DIFFERENT")
    return 1 if different else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="erase with every method from the checkout SRC, write OUT")
    d.add_argument("src")
    d.add_argument("out")
    c = sub.add_parser("compare", help="are two dumps bitwise equal (exit 1 if not)")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    if args.cmd == "dump":
        dump(args.src, args.out)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())

"""Threads sharing one pipeline: ``with edit.applied(pipe)`` and ``generate`` take the pipeline's lock,
so a plain call never samples an edited pipeline, edited blocks never overlap, and the pipeline ends
exactly as it started (erasekit.pipelines.locking)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from erasekit.errors import EditError
from erasekit.pipelines import Edit, Sampling, cross_attention_kv, generate
from erasekit.pipelines.edit import BaseCheckSkippedWarning

PROMPT, SEED = "a painting of a cat", 3
SAMPLING = Sampling(steps=2, batch_size=1)


def _edit(pipe, seed: int) -> Edit:
    """A dense change of every cross-attention key/value projection (visible in the images)."""
    g = torch.Generator().manual_seed(seed)
    new = {f"unet/{name}.weight": m.weight.detach() + 0.5 * torch.randn(m.weight.shape, generator=g)
           for name, m in cross_attention_kv(pipe.unet).items()}
    return Edit.from_weights(pipe, new, {"method": "test", "concepts": ["cat"]}, low_rank=False)


def _image(pipe) -> np.ndarray:
    return generate(pipe, PROMPT, SEED, SAMPLING, output_type="np")[0]


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}/{k}": v.clone() for c in ("unet", "text_encoder", "vae")
            for k, v in getattr(pipe, c).state_dict().items()}


def _run(workers) -> list[BaseException]:
    errors: list[BaseException] = []

    def guard(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 -- reported by the test
            errors.append(e)

    threads = [threading.Thread(target=guard, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hangs (deadlock?)"
    return errors


def test_four_threads_never_see_each_others_edits(tiny_sd1):
    pipe = tiny_sd1
    original = _weights(pipe)
    edits = [_edit(pipe, 1), _edit(pipe, 2)]
    plain = _image(pipe)
    edited = []
    for e in edits:
        with e.applied(pipe):
            edited.append(_image(pipe))
    assert all(not np.array_equal(plain, x) for x in edited) and not np.array_equal(*edited)
    start, outputs = threading.Barrier(4), {"plain": [], 0: [], 1: []}

    def edited_worker(i):
        def work():
            start.wait()
            for _ in range(3):
                with edits[i].applied(pipe):
                    outputs[i].append(_image(pipe))
        return work

    def plain_worker():
        start.wait()
        for _ in range(4):
            outputs["plain"].append(_image(pipe))

    errors = _run([edited_worker(0), plain_worker, edited_worker(1), plain_worker])
    assert not errors, errors
    assert len(outputs["plain"]) == 8 and len(outputs[0]) == len(outputs[1]) == 3
    assert all(np.array_equal(x, plain) for x in outputs["plain"])          # no Edit leaked into a plain call
    for i in (0, 1):
        assert all(np.array_equal(x, edited[i]) for x in outputs[i])       # and each block saw only its own
    after = _weights(pipe)
    assert all(torch.equal(original[k], after[k]) for k in original)       # bitwise the original pipeline


def test_generate_waits_for_an_applied_block_to_end(tiny_sd1):
    """Deterministic: thread A holds the Edit for up to 2 s waiting for B's call to finish; B's call
    must instead wait for A's block and then sample the unedited pipeline."""
    pipe = tiny_sd1
    edit, plain = _edit(pipe, 1), _image(pipe)
    entered, b_done, seen = threading.Event(), threading.Event(), {}

    def a():
        with edit.applied(pipe):
            entered.set()
            seen["b_finished_inside_block"] = b_done.wait(timeout=2.0)

    def b():
        entered.wait(timeout=60)
        seen["image"] = _image(pipe)
        b_done.set()

    assert not _run([a, b])
    assert seen["b_finished_inside_block"] is False
    assert np.array_equal(seen["image"], plain)


def test_edits_come_off_in_reverse_order(tiny_sd1):
    """Applied by hand (no block), a second Edit on the same weights must come off first: removing the
    first one would restore weights under the second and leave the pipeline edited for good."""
    pipe = tiny_sd1
    original = _weights(pipe)
    first, second = _edit(pipe, 1), _edit(pipe, 2)
    first.apply(pipe)
    with pytest.warns(BaseCheckSkippedWarning):      # its fingerprint is of the unedited pipeline
        second.apply(pipe, unsafe_skip_base_check=True)
    with pytest.raises(EditError, match="remove that one first"):
        first.remove(pipe)
    second.remove(pipe)
    first.remove(pipe)
    after = _weights(pipe)
    assert all(torch.equal(original[k], after[k]) for k in original)

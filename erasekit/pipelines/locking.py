"""One re-entrant lock per pipeline, so threads that share a pipeline never see it half edited.

A stock pipeline is one mutable object: :meth:`Edit.apply <erasekit.pipelines.Edit.apply>` writes
its weights in place and :func:`~erasekit.pipelines.generate` swaps its scheduler for the call. Both
take the pipeline's lock, and ``with edit.applied(pipe):`` / ``edit.sampled(pipe)`` hold it for the
whole block, so:

- a plain ``generate(pipe, ...)`` in another thread waits for the block to end and never samples
  the edited weights;
- two threads' blocks on one pipeline run one after the other, so they cannot exit out of order
  and leave the pipeline edited;
- the lock is re-entrant: inside a block, the same thread generates, attacks and evaluates freely.

Code that calls the pipeline itself (``pipe(prompt)``) rather than through ``generate`` takes the
lock the same way: ``with pipeline_lock(pipe): pipe(...)``. A raw ``edit.apply(pipe)`` stays on
until ``edit.remove(pipe)``; other threads see it in between (use the blocks to avoid that).

The state (lock, and the Edits applied in order) is kept in a :class:`weakref.WeakKeyDictionary`
keyed by the pipeline, so it goes when the pipeline goes. A one-step pipeline built from a stock
one shares its text encoders and VAE, so it shares its state too (:func:`share_lock`).
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Callable


class _State:
    def __init__(self):
        self.lock = threading.RLock()
        self.applied: list = []   # Edits applied to the pipeline, oldest first


_STATES: "weakref.WeakKeyDictionary[object, _State]" = weakref.WeakKeyDictionary()
_BY_ID: dict[int, _State] = {}   # objects that take no weak reference (rare: test doubles)
_GUARD = threading.Lock()


def _state(pipe) -> _State:
    with _GUARD:
        try:
            state = _STATES.get(pipe)
            if state is None:
                state = _STATES[pipe] = _State()
        except TypeError:   # not weak-referenceable
            state = _BY_ID.setdefault(id(pipe), _State())
        return state


def pipeline_lock(pipe) -> threading.RLock:
    """The re-entrant lock of ``pipe`` (created on first use)."""
    return _state(pipe).lock


def applied_edits(pipe) -> list:
    """The Edits applied to ``pipe`` and not yet removed, oldest first (change it under the lock)."""
    return _state(pipe).applied


def share_lock(derived, base) -> None:
    """Make ``derived`` (e.g. a one-step pipeline over ``base``'s modules) use ``base``'s lock."""
    state = _state(base)
    with _GUARD:
        try:
            _STATES[derived] = state
        except TypeError:
            _BY_ID[id(derived)] = state


def locked(fn: Callable) -> Callable:
    """Decorator: run ``fn(pipe, ...)`` holding ``pipe``'s lock."""

    @functools.wraps(fn)
    def wrapper(pipe, *args, **kwargs):
        with pipeline_lock(pipe):
            return fn(pipe, *args, **kwargs)

    return wrapper

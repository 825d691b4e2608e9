"""Safe file I/O: atomic writes and safetensors-only checkpoints (never pickle)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .errors import OutputWriteError

# A temporary file is named ".<target>.<pid>@<host>.<random>.tmp", so a later write of the same target
# can tell a temp left by a killed writer (its process is gone) from one still being written.
_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()
_TMP_OWNER = re.compile(r"(\d+)@([0-9a-f]{8})\.[^.]+\.tmp")
_STALE_S = 24 * 3600  # a temp of another host (shared folder) is swept only when this old


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def sweep_orphan_temps(path: str | Path) -> list[Path]:
    """Delete temporary files of ``path`` whose writer died (kill -9 mid-save); returns what was removed.

    A temp of this host is an orphan when its process is gone; one of another host (a shared folder)
    or with an unknown name when it has not been touched for a day.
    """
    path = Path(path)
    removed = []
    prefix = f".{path.name}."
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return removed
    for tmp in candidates:
        owner = _TMP_OWNER.fullmatch(tmp.name[len(prefix):])
        try:
            if owner and owner.group(2) == _HOST:
                orphan = int(owner.group(1)) != os.getpid() and not _pid_alive(int(owner.group(1)))
            else:
                orphan = time.time() - tmp.stat().st_mtime > _STALE_S
            if orphan:
                tmp.unlink()
                removed.append(tmp)
        except OSError:  # gone already, or not ours to delete
            continue
    return removed


def _write_error(path: Path, e: BaseException) -> OutputWriteError:
    code = getattr(e, "errno", None)
    text = str(e)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "os error 28" in text:
        why = "the disk is full (no space left on device); free space or choose another folder"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text:
        why = "permission denied; choose a folder you can write to"
    else:
        why = f"{getattr(e, 'strerror', None) or text}"
    return OutputWriteError(f"cannot write {path}: {why}; any previous file there is unchanged")


def _is_io_error(e: BaseException) -> bool:
    """An OSError, or safetensors' error for a failed file write (it wraps the OS error in its text)."""
    return isinstance(e, OSError) or (type(e).__name__ == "SafetensorError" and "os error" in str(e))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    The temporary file is removed on any error; one left by a killed process is swept by the next
    write of the same ``path``. A failed write (full disk, no permission) raises
    :class:`~erasekit.errors.OutputWriteError` and leaves any previous ``path`` as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_orphan_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}@{_HOST}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except Exception as e:
        if _is_io_error(e) and not isinstance(e, OutputWriteError):
            raise _write_error(path, e) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(path: str | Path) -> None:
    """Raise :class:`~erasekit.errors.OutputWriteError` unless a file can be created at ``path``.

    Meant for the start of a long run, so that an unwritable output fails in a second, not after
    the work. Creates no folder: it probes the nearest existing one.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputWriteError(f"cannot write {path}: it is a folder; give a file path")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputWriteError(f"cannot write {path}: {folder} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".erasekit-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise _write_error(path, e) from None


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write tensors to one safetensors file atomically; ``metadata`` is stored as JSON strings."""
    from safetensors.torch import save_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: (tensors, raw metadata strings)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict, dict]:
    """Flatten an optimizer's state into tensors plus JSON-able scalars (for safetensors checkpoints)."""
    state = opt.state_dict()
    tensors, scalars = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, st in state["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{prefix}.{idx}.{key}"] = val
            else:
                scalars["state"].setdefault(str(idx), {})[key] = val
    return tensors, scalars


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict, scalars: dict,
                           prefix: str = "optim") -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    for idx, st in scalars.get("state", {}).items():
        state.setdefault(int(idx), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})

"""The efficiency triplet of an unlearning run: wall time, peak memory, storage (metrics.md section 3).

Time and peak memory are measured by :func:`erasekit.erase` around the method call (CUDA max
allocated on GPU, peak resident set size on CPU) and stored in the Edit's manifest; storage is
the size of the minimal artifact that rebuilds the unlearned model from the base, i.e. the Edit
(bytes on disk when a file is given, else the bytes of the tensors it stores).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Efficiency:
    wall_time_s: float | None
    peak_memory_bytes: int | None
    memory_kind: str | None       # "cuda_max_allocated" or "cpu_rss"
    storage_bytes: int
    storage_kind: str             # "file" or "tensor bytes"
    method: str | None = None
    dtype: str | None = None
    device: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def row(self) -> dict[str, str]:
        """Human units: seconds, GB (1e9 B), MB."""
        def gb(x):
            return "-" if x is None else f"{x / 1e9:.2f} GB"

        return {"time": "-" if self.wall_time_s is None else f"{self.wall_time_s:.1f} s",
                "memory": gb(self.peak_memory_bytes), "storage": f"{self.storage_bytes / 1e6:.3f} MB"}


def edit_efficiency(edit, path: str | Path | None = None) -> Efficiency:
    """The triplet of ``edit`` (its manifest), with storage from ``path`` if the Edit was saved there."""
    m = edit.manifest
    if path is not None and Path(path).is_file():
        storage, kind = Path(path).stat().st_size, "file"
    else:
        storage, kind = edit.nbytes(), "tensor bytes"
    return Efficiency(m.get("wall_time_s"), m.get("peak_memory_bytes"), m.get("memory_kind"), int(storage), kind,
                      m.get("method"), m.get("dtype"), m.get("device"))

"""Which server files the preview may read: only those inside the folders it was started with.

A path that a visitor types or uploads is resolved (``..`` collapsed, symlinks followed) and must
then lie inside one of the allowed roots (resolved once, at start) or be one of the allowed files.
A symlink inside a root that points out of it is therefore refused. A missing path and a forbidden
one raise the same message, which never repeats the path, so the preview cannot be used to find out
which files exist on the server.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ErasekitError

MAX_WALK = 20_000  # directory entries a report listing looks at before it stops


class PathGuard:
    """Resolve visitor-given paths against ``roots`` (folders) and ``files`` (single files).

    A relative path is looked up under each root in turn; an absolute one is taken as it is. ``~``
    is not expanded: it names the server user's home, which a visitor has no business reading.
    """

    def __init__(self, roots=(), files=()):
        self.roots = [Path(r).expanduser().resolve() for r in roots if r]
        self.files = {Path(f).expanduser().resolve() for f in files if f}

    def allows(self, path: Path) -> bool:
        """True if the resolved ``path`` is an allowed file or lies inside an allowed root."""
        return path in self.files or any(path.is_relative_to(root) for root in self.roots)

    def resolve(self, text, kind: str, refusal: str) -> Path:
        """The resolved, allowed path ``text`` names (a ``"file"`` or a ``"dir"``), else raise ``refusal``."""
        if isinstance(text, os.PathLike):
            text = os.fspath(text)
        if not isinstance(text, str) or not text.strip():
            raise ErasekitError(refusal)
        given = Path(text.strip())
        candidates = [given] if given.is_absolute() else [root / given for root in self.roots]
        for candidate in candidates:
            try:
                path = candidate.resolve(strict=True)
                found = path.is_file() if kind == "file" else path.is_dir()
            except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, a NUL byte
                continue
            if found and self.allows(path):
                return path
        raise ErasekitError(refusal)

    def walk(self, folder: Path, suffixes: tuple[str, ...]) -> list[tuple[str, Path]]:
        """(name relative to ``folder``, resolved path) of the allowed files under ``folder`` ending in
        ``suffixes``, sorted; symlinked folders are not entered, symlinks resolving outside are left out."""
        found, seen = [], 0
        for top, dirs, names in os.walk(folder, followlinks=False):
            dirs.sort()
            for name in sorted(names):
                seen += 1
                if seen > MAX_WALK:
                    return sorted(found)
                if not name.lower().endswith(suffixes):
                    continue
                try:
                    path = (Path(top) / name).resolve(strict=True)
                except (OSError, RuntimeError):
                    continue
                if path.is_file() and self.allows(path):
                    found.append(((Path(top) / name).relative_to(folder).as_posix(), path))
        return sorted(found)

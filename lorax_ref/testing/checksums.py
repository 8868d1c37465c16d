"""Checksums of whole directories, for tests that prove a command left its inputs untouched."""
from __future__ import annotations

import os
from pathlib import Path

from ..files.reader import hash_bytes


def files_sha256(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of ``path`` itself), read from disk every time (never cached)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p.relative_to(path) if path.is_dir() else p.name): hash_bytes(p) for p in files}

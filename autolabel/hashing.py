"""Content hashes that identify inputs (corpus files, transcoder weights) wherever they lie."""

from __future__ import annotations

import hashlib
from pathlib import Path


def hash_path(path: Path, salt: str = "") -> str:
    """sha256 of a file, or of every file under a folder (relative names and contents, in order)."""
    digest = hashlib.sha256(salt.encode())
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0".encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()

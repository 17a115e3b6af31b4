"""Files that hold secrets: written private (mode 0600 unless said), owned by who reads them."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, content: str | bytes, mode: int = 0o600) -> None:
    """Write ``path`` (creating its folder) with ``mode`` from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def chown_tree(path: Path, uid: int) -> None:
    """Give ``path`` and everything under it to ``uid`` (group ``uid`` too)."""
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, uid)

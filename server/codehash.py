"""A hash of the code that runs: every .py and profile file of the radfed app, in path order."""

from __future__ import annotations

import hashlib
from pathlib import Path

APP_ROOT = Path(__file__).resolve().parent.parent
PARTS = ("common", "client", "server")


def code_sha256(root: Path = APP_ROOT) -> str:
    digest = hashlib.sha256()
    files = sorted(p for part in PARTS for p in (root / part).rglob("*")
                   if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts)
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()

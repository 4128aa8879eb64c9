"""Canonical serialisation and hashes that both sides must compute identically."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def canonical_json(doc: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 kept: the one form that is hashed."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(doc: Any) -> str:
    return sha256_text(canonical_json(doc))


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """Hash of named arrays: name, dtype, shape and bytes of each, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def json_safe(value: Any) -> Any:
    """NaN/Inf -> None and numpy scalars -> Python, recursively, so the result is strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks (images and model.pt can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

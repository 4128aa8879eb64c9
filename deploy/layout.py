"""The deployment folder of `radfed deploy`: where each file lives and the records of started processes.

    pki/            CA and SuperLink certificate (deploy.pki)     keys/    one node key pair per site
    procs/<n>.json  pid, role, ports of each process we started   logs/    their logs
    state/          the SuperLink's database                      home/    private FLWR_HOMEs
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

CONNECTION = "radfed"
DEFAULT_DIR = Path(os.environ.get("RADFED_DEPLOY_DIR", "~/.radfed/deploy")).expanduser()



def pki(d: Path) -> Path:
    return d / "pki"


def home(d: Path, name: str = "coordinator") -> Path:
    """A private FLWR_HOME: ``coordinator`` for the SuperLink and the flwr CLI, one per SuperNode."""
    return d / "home" / name


def record_path(d: Path, name: str) -> Path:
    return d / "procs" / f"{name}.json"


def log_path(d: Path, name: str) -> Path:
    return d / "logs" / f"{name}.log"


def read_record(d: Path, name: str) -> dict[str, Any] | None:
    path = record_path(d, name)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def records(d: Path) -> list[dict[str, Any]]:
    found = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((d / "procs").glob("*.json"))]
    order = {"supernode": 0, "gateway": 1, "superlink": 2}  # SuperNodes first, the SuperLink last
    return sorted(found, key=lambda r: order.get(r["role"], 0))


def write_record(d: Path, record: dict[str, Any]) -> None:
    path = record_path(d, record["name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # unique: no race
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(record, indent=2))
    os.replace(tmp, path)


def write_connection(d: Path, address: str) -> Path:
    """The coordinator's ``config.toml``: one `radfed` connection (address + the CA to trust)."""
    config = home(d) / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    ca = (pki(d) / "ca.crt").resolve()
    config.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                      f'address = "{address}"\nroot-certificates = "{ca}"\n', encoding="utf-8")
    return config

"""The deployment folder of `radfed deploy`: where each file lives and the records of started processes.

    pki/            CA and SuperLink certificate (deploy.pki)     keys/    one node key pair per site
    procs/<n>.json  pid, role, ports of each process we started   logs/    their logs
    state/          the SuperLink's database                      home/    private FLWR_HOMEs

and where a run's results are: ``<output-dir>/<time>-run<run id>`` (server/app.py ``run_folder``).
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


def run_folder(output_dir: Path, run_id: int) -> Path | None:
    """The results folder the ServerApp made for run ``run_id`` under its output-dir, if it made one.
    Flower's run ids are random 64-bit numbers, so one folder matches (the newest, should a run id recur)."""
    found = sorted(p for p in output_dir.glob(f"*-run{run_id}") if p.is_dir())
    return found[-1] if found else None

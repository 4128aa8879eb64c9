"""Shared by the tests that run whole federations on Flower's simulation engine."""

from __future__ import annotations

import json
from pathlib import Path

import ray_head

from radfed.cli import approve_demo_plan
from radfed.launch import run_federation

K = 5
ROUNDS = 3


def run_federation_in(tmp_path: Path, data_root: Path, n_sites: int, unapproved: tuple[str, ...] = (),
                      **config: object) -> Path:
    """One approved simulated run over the sites under ``data_root`` (those in ``unapproved`` do not approve
    its plan); returns its run folder."""
    out = tmp_path / "runs"
    # FedAvg for ROUNDS rounds unless a test says otherwise: the tiny sites' 10-20 training cases are too few for
    # the default exact training with the default 8 features, and these tests check the protocol, not the fit
    run_config = {"data-root": str(data_root), "output-dir": str(out), "training": "fedavg",
                  "num-server-rounds": ROUNDS, "min-cases-per-class": K, "query-timeout": 600.0, **config}
    # the sites the simulation serves (client.steps): folders holding a manifest.csv or a site.yaml
    sites = sorted(p for p in data_root.iterdir() if (p / "manifest.csv").exists() or (p / "site.yaml").exists())
    approve_demo_plan([s for s in sites if s.name not in unapproved], run_config)
    with ray_head.joined():  # one Ray cluster for the session's runs (tests/ray_head.py says why)
        run_federation(run_config, num_supernodes=n_sites, flwr_home=tmp_path / "flwr", echo=False, timeout=900)
    runs = sorted(out.glob("*-run*"))
    log = tmp_path / "flwr" / "flwr-run.log"
    assert len(runs) == 1 and (runs[0] / "metrics.json").exists(), log.read_text(encoding="utf-8")[-3000:]
    return runs[0]


def events(folder: Path) -> list[dict]:
    """The run's audit log entries."""
    return [json.loads(line) for line in (folder / "audit.jsonl").read_text(encoding="utf-8").splitlines()]


def numbers(value) -> list[float]:
    """Every number in a JSON value (outbox records), flattened."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    return [x for v in value for x in numbers(v)]

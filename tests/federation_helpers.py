"""Shared by the tests that run whole federations on Flower's simulation engine."""

from __future__ import annotations

import json
from pathlib import Path

import ray_head

from radfed.cli import approve_demo_plan
from radfed.launch import STOPPED_AT_END, run_federation

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
        code = run_federation(run_config, num_supernodes=n_sites, flwr_home=tmp_path / "flwr", echo=False,
                              timeout=900)
    runs = sorted(out.glob("*-run*"))
    log = (tmp_path / "flwr" / "flwr-run.log").read_text(encoding="utf-8")
    assert len(runs) == 1 and (runs[0] / "metrics.json").exists(), log[-3000:]
    # the launcher stopped Flower's processes at the ServerApp's last line, not after Flower's own teardown, and
    # none of them is left
    status = json.loads((runs[0] / "metrics.json").read_text(encoding="utf-8"))["status"]
    assert STOPPED_AT_END.format(status=status) in log and code == (0 if status == "completed" else 1), log[-3000:]
    assert not flower_processes_of(tmp_path / "flwr")
    return runs[0]


def switched_runs(tmp_path: Path, n_sites: int, seed: int, switch: str,
                  **config: object) -> tuple[Path, dict[bool, Path], dict[bool, dict]]:
    """Two runs over the same tiny sites (``n_sites`` of 12 cases per class, seeds from ``seed``), exact training of
    3 features with leave-one-site-out and no local-only baselines unless ``config`` says otherwise, with the run
    config's ``switch`` on and off: the sites' folder, and each run's folder and metrics.json by the switch's value.
    Both runs completed."""
    from radfed import synth

    root = tmp_path / "data"
    for i, spec in enumerate(synth.tiny_sites(n_sites, 12)):
        synth.write_site(root, spec, seed=seed + i)
    config = {"training": "exact", "select-features": 3, "external-validation": "loso", "local-only": "none",
              **config}
    runs = {on: run_federation_in(tmp_path / str(on), root, n_sites, **config, **{switch: on}) for on in (True, False)}
    docs = {on: json.loads((f / "metrics.json").read_text(encoding="utf-8")) for on, f in runs.items()}
    assert docs[True]["status"] == docs[False]["status"] == "completed", docs[True].get("error") or docs[False]
    return root, runs, docs


def flower_processes_of(flwr_home: Path) -> list[str]:
    """Command lines of the live processes started with this FLWR_HOME (the launcher sets it for all of them)."""
    mark, found = f"FLWR_HOME={flwr_home}".encode(), []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "environ").read_bytes().split(b"\0"):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


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

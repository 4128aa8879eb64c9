"""What tests/test_deploy.py and tests/test_deploy_redteam.py share: driving the installed `radfed deploy`, a
deployment's setup and teardown, runs, and a SuperNode started by hand that must be refused.

Every process a helper starts is stopped by its id (its process group), also when an assertion fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.runconfig import LOCAL_KEYS
from deploy import flower
from deploy.layout import read_record, records
from deploy.processes import env_for, flower_processes, free_port, stop_processes
from radfed.cli import approve_demo_plan
from radfed.launch import overrides_text
from server.audit import load_or_create_key, public_pem

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(PY).parent
RADFED = str(BIN / "radfed")
K, PER_CLASS, TEST_FRACTION = 5, 10, 0.3  # 10 per class: two release blocks of k (one trains, one is held out)
RUN_TIMEOUT = 480  # one whole run, including a crashed site's 60 s heartbeat expiry


@dataclass
class Deployment:
    dir: Path
    sites: dict[str, Path]  # site name -> its folder
    runs: Path  # every run's output-dir is a folder in here
    audit_key: Path

    def pinned_pubkey(self) -> Path:
        """The coordinator's audit public key, as an auditor would pin it (not the copy beside the log)."""
        path = self.runs / "coordinator.pub"
        path.write_bytes(public_pem(load_or_create_key(self.audit_key)))
        return path


def deploy(d: Path, *args: str, timeout: float = 120, check: bool = True,
           prefix: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """`radfed deploy <args> --dir d`, run through ``prefix`` (e.g. into a network namespace)."""
    done = subprocess.run([*prefix, RADFED, "deploy", *args, "--dir", str(d)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if check:
        assert done.returncode == 0, f"deploy {' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def start_supernode(dep: Deployment, name: str, patience: float = 90, prefix: Sequence[str] = ()) -> None:
    """Start a site's SuperNode; a node that crashed is refused (305) until the SuperLink has marked it
    offline (no heartbeat for up to 60 s), so retry until then."""
    deadline = time.monotonic() + patience
    while True:
        done = deploy(dep.dir, "supernode", "--name", name, "--site", str(dep.sites[name]), "--wait", "60",
                      check=False, prefix=prefix)
        if done.returncode == 0 or time.monotonic() > deadline or "305" not in done.stderr:
            assert done.returncode == 0, f"SuperNode {name} did not join:\n{done.stdout}\n{done.stderr}"
            return
        time.sleep(5)


def ensure_supernodes(dep: Deployment) -> None:
    for name in dep.sites:
        rec = read_record(dep.dir, name)
        if rec is None or not flower_processes(int(rec["pid"])):
            start_supernode(dep, name)


def stop_deployment(dep: Deployment) -> None:
    """`radfed deploy stop`, then whatever it could not stop."""
    with suppress(Exception):
        deploy(dep.dir, "stop", "--grace", "25", timeout=150, check=False)
    stop_processes(records(dep.dir), grace=5)


def supernodes(dep: Deployment) -> dict[int, str]:
    """Node id -> status, as the coordinator's `flwr supernode ls --format json` reports them."""
    return {int(n["node-id"]): n["status"] for n in flower.supernodes(dep.dir)}


def run_config(dep: Deployment, name: str, **overrides: object) -> dict[str, object]:
    # FedAvg unless a test says otherwise: these tests are about train messages crossing real SuperNodes round by
    # round (a site crashing mid-round, heartbeats, receipts), and the tiny sites are too small for exact training on
    # the default 8 features (tests/test_deploy_redteam.py runs exact training on 3)
    return {"output-dir": str(dep.runs / name), "audit-key": str(dep.audit_key), "training": "fedavg",
            "num-server-rounds": 2,
            "local-epochs": 1, "min-cases-per-class": K, "test-fraction": TEST_FRACTION,
            "external-validation": "none", "local-only": "none", **overrides}


def start_run(dep: Deployment, config: dict[str, object]) -> subprocess.Popen:
    """`radfed deploy run --plan` in the background, after every site approved this run's plan: the coordinator
    writes the plan, the sites approve its hash, the run takes its settings from that file (and only where the
    coordinator keeps things from --run-config)."""
    plan_hash = approve_demo_plan(list(dep.sites.values()), config)
    plan_file = dep.dir / f"plan-{plan_hash[:12]}.json"
    written = subprocess.run([RADFED, "plan", "write", "--output", str(plan_file), "--run-config",
                              overrides_text(config), "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert written.returncode == 0 and json.loads(written.stdout)["plan_sha256"] == plan_hash, written.stderr
    local = {k: v for k, v in config.items() if k in LOCAL_KEYS}
    return subprocess.Popen([RADFED, "deploy", "run", "--dir", str(dep.dir), "--plan", str(plan_file),
                             "--run-config", overrides_text(local), "--quiet"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"deploy run did not finish within {timeout:.0f}s:\n{out}")
    return proc.returncode, out


def wait_for_event(proc: subprocess.Popen, output_dir: Path, event: str, timeout: float = 300) -> None:
    """Until the run's audit log holds an ``event`` entry."""
    needle = f'"event":"{event}"'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(needle in p.read_text() for p in output_dir.glob("*/audit.jsonl")):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before any {event!r} entry:\n{proc.communicate()[0]}")
        time.sleep(0.5)
    pytest.fail(f"no {event!r} entry in the audit log within {timeout:.0f}s")


def run_folder(output_dir: Path) -> tuple[Path, dict, list[dict]]:
    folders = sorted(output_dir.glob("*-run*"))
    assert len(folders) == 1, folders
    events = [json.loads(line) for line in (folders[0] / "audit.jsonl").read_text().splitlines()]
    return folders[0], json.loads((folders[0] / "metrics.json").read_text()), events


def refused_supernode(superlink: str, logs: Path, flwr_home: Path, *args: str, site_dir: str = "/nonexistent",
                      prefix: Sequence[str] = ()) -> str:
    """Start flower-supernode by hand against ``superlink`` (through ``prefix``), let it give up, and assert
    it was refused: Flower exit code 305 and never a node id. Its log text."""
    log = logs / f"refused-supernode-{len(list(logs.glob('refused-supernode-*.log')))}.log"
    cmd = [*prefix, str(BIN / "flower-supernode"), "--superlink", superlink, "--node-config", f"site-dir='{site_dir}'",
           "--port", str(free_port()), "--max-retries", "1", "--max-wait-time", "10", *args]
    # output to a file, not a pipe: the flower-superexec it starts outlives it and would hold a pipe open
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env_for(flwr_home), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        proc.wait(timeout=90)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert proc.returncode != 0, text
    assert flower.exit_code_in_log(log) == 305 and flower.node_id_in_log(log) is None, text
    return text

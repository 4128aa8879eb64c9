"""The README's "Running with Flower directly" block, run as written in a clean shell (no activated venv, a home
of its own): it completes a run and leaves no process behind.

Two documented changes keep it short: the port is a free one, and the run-config override the README describes
("overrides go to both `radfed plan write` and `flwr run`") runs the default exact training on 3 features (what
the tiny sites' 10 training cases allow) without the extra folds.
The hospitals are tiny synthetic ones where `make demo` would put its own."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import psutil

from deploy.processes import free_port
from radfed import synth

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = "select-features=3 external-validation='none' local-only='none'"


def _readme_block() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(r"## Running with Flower directly.*?```bash\n(.*?)```", readme, re.S)
    assert found, "README.md has no bash block under 'Running with Flower directly'"
    return found.group(1)


def _edit(block: str, old: str, new: str) -> str:
    assert old in block, f"the README no longer holds {old!r}: update this test with it"
    return block.replace(old, new)


def _ours(home: Path) -> list[psutil.Process]:
    """Processes started under this test's home (the shell exports it to everything it starts)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("HOME") == str(home):
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def test_running_with_flower_directly_works_as_written(tmp_path):
    home = tmp_path / "home"
    for i, spec in enumerate(synth.tiny_sites(4, 10)):
        synth.write_site(home / ".radfed" / "demo", replace(spec, name=f"hospital-{'abcd'[i]}"), seed=900 + i)
    block = _readme_block()
    block = _edit(block, "PORT=39391", f"PORT={free_port()}")
    block = _edit(block, 'radfed plan write --output "$FLWR_HOME/plan.json" --json',
                  f'radfed plan write --output "$FLWR_HOME/plan.json" --run-config "{OVERRIDES}" --json')
    block = _edit(block, "flwr run . radfed-sim --stream", f'flwr run . radfed-sim --stream --run-config "{OVERRIDES}"')
    # Flower starts its own Ray cluster here (no RAY_ADDRESS), whose session folder Ray keeps after the run: a
    # short folder of the test's own (Ray's unix sockets need paths below 108 characters), not /tmp/ray
    ray_tmp = tempfile.mkdtemp(prefix="rfray-", dir="/tmp")
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",  # no venv on the PATH
           "RAY_TMPDIR": ray_tmp, "TMPDIR": str(tmp_path)}  # the README's `mktemp -d` FLWR_HOME goes here too
    try:
        done = subprocess.run(["bash", "-c", block], cwd=REPO, env=env, capture_output=True, encoding="utf-8",
                              errors="replace", timeout=1200, check=False)
        runs = sorted((home / ".radfed" / "runs").glob("*-run*"))
        assert len(runs) == 1, done.stdout[-3000:] + done.stderr[-3000:]
        doc = json.loads((runs[0] / "metrics.json").read_text(encoding="utf-8"))
        assert doc["status"] == "completed", doc["error"]
        assert sorted(doc["final"]["sites"]) == [f"hospital-{x}" for x in "abcd"]
        assert "approved run plan" in done.stdout
        # the README's kill stopped everything it started (SIGTERM: give them the time to exit)
        _, alive = psutil.wait_procs(_ours(home), timeout=60)
        assert not alive, [(p.pid, p.cmdline()[:3]) for p in alive]
    finally:
        for proc in _ours(home):  # a failed run must not leave this test's SuperLink behind either
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)

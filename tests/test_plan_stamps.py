"""The run plan's code hash at a site (client.approvals): a module's file, once this process imported it, is no
longer stamped per message (it cannot change what the process runs), while every file not imported is, so a change
to code the site could still load counts from the next check, as does re-importing a module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# run in a copy of the app (its files are edited): approve, check, edit an imported module, check, edit a module not
# imported, check; then the imported module re-imported from its edited file, check again
SCRIPT = r'''
import importlib, json, sys, time
from pathlib import Path
from client import runcache
from client.approvals import NotApproved, check_approved
from common.plan import APP_ROOT, code_files
from radfed import synth
from radfed.cli.coordinator import approve_demo_plan
from radfed.launch import app_run_config

site = synth.write_site(Path(sys.argv[1]), synth.tiny_sites(1, 6)[0], seed=1)
config = app_run_config({"data-root": str(site.parent)})
approved = approve_demo_plan([site], config)
time.sleep(2 * runcache.SETTLE_FINE_NS / 1e9)  # every file older than the settling time: the plan is kept


def check():
    try:
        return check_approved(site, config)[0]
    except NotApproved:
        return "refused"


def edit(name):
    path = APP_ROOT / (name.replace(".", "/") + ".py")
    path.write_text(path.read_text() + "\n# edited\n")


out = {"approved": approved, "first": check()}
edit("client.site")  # imported: the process runs the code it imported
out["imported edited"] = check()
lazy = next(".".join(p.relative_to(APP_ROOT).with_suffix("").parts) for p in code_files()
            if p.suffix == ".py" and p.name != "__init__.py" and p.parts[-2] == "client"
            and ".".join(p.relative_to(APP_ROOT).with_suffix("").parts) not in sys.modules)
edit(lazy)  # not imported yet: a later import would run the edited file
out["lazy"], out["not imported edited"] = lazy, check()
print(json.dumps(out))
'''

REIMPORT = r'''
import importlib, json, sys, time
from pathlib import Path
from client import runcache
from client.approvals import NotApproved, check_approved
from common.plan import APP_ROOT
from radfed import synth
from radfed.cli.coordinator import approve_demo_plan
from radfed.launch import app_run_config

site = synth.write_site(Path(sys.argv[1]), synth.tiny_sites(1, 6)[0], seed=1)
config = app_run_config({"data-root": str(site.parent)})
approve_demo_plan([site], config)
time.sleep(2 * runcache.SETTLE_FINE_NS / 1e9)
first = check_approved(site, config)[0]
path = APP_ROOT / "client" / "sitefiles.py"
path.write_text(path.read_text() + "\n# edited\n")
same = check_approved(site, config)[0]
importlib.reload(sys.modules["client.sitefiles"])  # the edited file now runs in this process
try:
    after = check_approved(site, config)[0]
except NotApproved:
    after = "refused"
print(json.dumps({"first": first, "same": same, "after": after}))
'''


def _app_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "app"
    for part in ("common", "client", "server", "radfed"):
        shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


def _run(script: str, tmp_path: Path) -> dict:
    copy = _app_copy(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "sites")], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_imported_module_edited_keeps_the_plan_a_module_not_imported_does_not(tmp_path):
    t = time.perf_counter()
    out = _run(SCRIPT, tmp_path)
    assert out["first"] == out["approved"]
    assert out["imported edited"] == out["approved"]  # the code this process runs did not change
    assert out["lazy"].startswith("client.")
    assert out["not imported edited"] == "refused"  # another plan hash: not approved
    assert time.perf_counter() - t < 60


def test_a_module_imported_again_from_its_edited_file_counts(tmp_path):
    out = _run(REIMPORT, tmp_path)
    assert out["first"] == out["same"]
    assert out["after"] == "refused"

"""What a ClientApp or ServerApp process loads before it can answer: no heavy library it does not use yet.

Each Ray worker of the simulation, and each per-message ClientApp process of a deployment, imports client.app
before it answers; torch alone took ~6 s of that on the 2-core machine (issue 20). Checked in a fresh interpreter
(this test process has long imported everything).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# SimpleITK: ~0.4 s of each simulation worker's first message; only reading images (extraction, checks) needs it
HEAVY = ("torch", "radiomics", "SimpleITK", "matplotlib", "scipy", "pandas", "sklearn")


def loaded_after(code: str) -> list[str]:
    """The HEAVY modules a fresh interpreter holds after running ``code`` in the project folder."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["client.app", "server.app"])
def test_apps_import_no_heavy_library(module: str) -> None:
    assert loaded_after(f"import {module}") == []


def test_pyradiomics_version_without_loading_pyradiomics() -> None:
    """The plan and features replies name pyradiomics' version (the cache is keyed by it): read from its version
    file, the same string as ``radiomics.__version__``, without importing the package."""
    code = """
from client.extract import pyradiomics_version
version = pyradiomics_version()
import sys
assert "radiomics" not in sys.modules
import radiomics
assert version == radiomics.__version__, (version, radiomics.__version__)
"""
    assert loaded_after(code) == ["SimpleITK", "radiomics"]  # pyradiomics loads SimpleITK: only for the check


def test_scoring_a_linear_model_needs_no_torch() -> None:
    """A site's evaluation (numpy arrays of the server's exact fit) scores without loading torch, with the same
    scores as from the torch state dict the model file holds."""
    code = """
import numpy as np
from client import compute
from common import exact
rng = np.random.default_rng(0)
x = rng.normal(size=(9, 3))
coef, mean, scale = np.array([0.2, 1.0, -0.5, 0.3]), rng.normal(size=3), rng.uniform(0.5, 2, size=3)
w = coef[1:].reshape(1, 3)
state = {"mean": mean, "scale": scale, "linear.weight": w, "linear.bias": coef[:1]}
p = compute.scores(x, state)
import sys
assert "torch" not in sys.modules
p_torch = compute.scores(x, exact.to_state_dict(coef, mean, scale))
assert np.array_equal(p, p_torch), (p, p_torch)
assert np.allclose(p, 1 / (1 + np.exp(-(coef[0] + ((x - mean) / scale) @ coef[1:]))), rtol=1e-12)
"""
    assert loaded_after(code) == ["torch"]  # torch only for the reference state dict, after the numpy scores


def test_the_coordinator_loads_the_report_modules_only_for_its_outputs() -> None:
    """The ServerApp's import is on the path to the simulation's Ray start (the same process); the report and its
    figures come at the first wait for replies (server.app.warm_imports) or at the outputs."""
    code = """
import server.app, sys
assert not [m for m in ("server.report", "server.plots", "server.report_sections") if m in sys.modules]
"""
    assert loaded_after(code) == []

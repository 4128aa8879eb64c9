"""A FedAvg run's site loads torch in the background from its first messages; an exact run never loads it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import sys, tomllib
sys.path.insert(0, {root!r})
from client import warmup
from client.steps import run_config
config = tomllib.loads(open({root!r} + "/pyproject.toml").read())["tool"]["flwr"]["app"]["config"]
warmup.prefetch_torch(run_config({{**config, "training": {training!r}}}))
for thread in warmup._TORCH_IMPORT:
    thread.join(120)
print("torch" in sys.modules, "common.model" in sys.modules)
"""


@pytest.mark.parametrize(("training", "loaded"), [("fedavg", "True True"), ("exact", "False False")])
def test_torch_is_loaded_ahead_only_for_fedavg(training: str, loaded: str) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), training=training)], capture_output=True,
                         text=True, timeout=300, check=True)
    assert out.stdout.split("\n")[-2] == loaded

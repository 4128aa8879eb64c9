"""Shared by the benchmarks: the demo's sites (features cached), and one approved federation run on them."""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from typing import Any

from radfed import synth
from radfed.cli.coordinator import approve_demo_plan, extract_sites
from radfed.launch import run_federation

ROOT = Path(__file__).resolve().parent.parent


def default_config() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def demo_sites(work: Path, workers: int = 2) -> list[Path]:
    """The default demo under ``work/demo``, extracted (kept between bench runs when ``work`` is reused)."""
    site_dirs = synth.make_demo(work / "demo", seed=0)
    extract_sites(site_dirs, "default", workers)
    return site_dirs


def federate(work: Path, site_dirs: list[Path], tag: str, **overrides: Any) -> tuple[dict[str, Any], float, Path]:
    """One approved federation on the demo; returns (metrics.json, wall seconds, run folder)."""
    run_config = {**default_config(), "data-root": str(work / "demo"), "output-dir": str(work / f"runs-{tag}"),
                  **overrides}
    approve_demo_plan(site_dirs, run_config)
    t = time.perf_counter()
    run_federation(run_config, num_supernodes=len(site_dirs), flwr_home=work / f"flwr-{tag}", echo=False)
    wall = time.perf_counter() - t
    folder = sorted((work / f"runs-{tag}").glob("*-run*"))[-1]
    return json.loads((folder / "metrics.json").read_text()), wall, folder

"""The run plan a site approves before anything touches its data.

One canonical form of: the app's code hash, the run config without the coordinator's local paths
(``common.runconfig.LOCAL_KEYS``), the extraction profile, the protocol version and every message type
with what its reply may hold. Its sha256 is what a hospital approves.
Both sides compute it themselves (the server from its run config, each site from the run config and
code it actually runs), so a site never has to trust a hash it was sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.canon import sha256_json
from common.profile import Profile
from common.protocol import PROTOCOL_VERSION, REPLIES
from common.runconfig import RunConfig, parse

PLAN_SCHEMA = "radfed.plan/1"
APP_ROOT = Path(__file__).resolve().parent.parent
CODE_PARTS = ("common", "client", "server")


def code_files(root: Path = APP_ROOT) -> list[Path]:
    """Every .py and profile file of the app (``common``, ``client``, ``server``), in path order."""
    return sorted(p for part in CODE_PARTS for p in (root / part).rglob("*")
                  if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts)


def code_sha256(root: Path = APP_ROOT) -> str:
    """sha256 over every .py and profile file of the app (``code_files``)."""
    digest = hashlib.sha256()
    for path in code_files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def messages() -> dict[str, dict[str, Any]]:
    """Every message type and what a site's reply to it may hold (keys, descriptions, array shapes)."""
    return {kind: {"config": dict(spec.config), "metrics": dict(spec.metrics),
                   "arrays": {k: {"shape": list(a.shape), "holds": a.description} for k, a in spec.arrays.items()},
                   "at_least_k_cases": list(spec.count_keys)}
            for kind, spec in REPLIES.items()}


def run_plan(run_config: RunConfig | Mapping[str, Any], profile: Profile, code: str | None = None) -> dict[str, Any]:
    """The plan of a run with this (complete) run config; raises RunConfigError on a bad value."""
    run = run_config if isinstance(run_config, RunConfig) else parse(run_config)
    return {"schema": PLAN_SCHEMA, "code_sha256": code or code_sha256(), "run_config": run.site_facing(),
            "profile": {"name": profile.name, "version": profile.version, "sha256": profile.sha256},
            "protocol": PROTOCOL_VERSION, "messages": messages()}


def plan_sha256(plan: Mapping[str, Any]) -> str:
    return sha256_json(dict(plan))


def summary(plan: Mapping[str, Any], site_k: int = 0) -> str:
    """The plan for the person who approves it: what runs, with which settings, and what would leave.

    ``site_k``: the site's own floor (site.yaml); the k that holds at the site is the larger of it and the run's.
    """
    run_k = int(plan["run_config"]["min-cases-per-class"])
    k = max(run_k, site_k)
    lines = [f"run plan {plan_sha256(plan)}",
             f"  code sha256      {plan['code_sha256']}",
             f"  profile          {plan['profile']['name']} v{plan['profile']['version']} "
             f"({plan['profile']['sha256'][:12]})",
             f"  protocol         {plan['protocol']}",
             "  run config:"]
    lines += [f"    {key} = {value!r}" for key, value in sorted(plan["run_config"].items())]
    covariates = plan["run_config"].get("combat-covariates")
    if covariates and plan["run_config"].get("harmonization") == "combat":
        lines += ["", f"ComBat reads these columns of your manifest: {covariates}. The values stay here; the ComBat",
                  "sums over each of their levels (at least k training cases each) leave."]
    held = (f"k = {k} at this site (the run asks {run_k}, this site's own floor is {site_k})" if site_k
            else f"k = {k}")
    lines += ["", f"What would leave this site (each statistic over at least {held}; arrays sized by the agreed",
              "feature counts, never by the number of cases; and no combination of what the site ever released",
              "singles out fewer than k patients: docs/privacy.md, the release rule):"]
    for kind, spec in plan["messages"].items():
        lines.append(f"  {kind}")
        for key, text in {**spec["config"], **spec["metrics"]}.items():
            lines.append(f"    {key}: {text}")
        for key, arr in spec["arrays"].items():
            lines.append(f"    {key} {tuple(arr['shape'])}: {arr['holds']}")
    return "\n".join(lines)

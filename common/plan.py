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
from common.protocol import PROTOCOL_VERSION, REPLIES, WITHHELD_WHEN_NOISED, reply_spec
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


def messages(noised: bool = False) -> dict[str, dict[str, Any]]:
    """Every message type and what a site's reply to it may hold (keys, descriptions, array shapes); with
    ``noised`` (differential privacy on the query phases) the noised replies in place of the exact ones, marked."""
    out = {}
    for kind in REPLIES:
        spec = reply_spec(kind, noised)
        assert spec is not None
        out[kind] = {"config": dict(spec.config), "metrics": dict(spec.metrics),
                     "arrays": {k: {"shape": list(a.shape), "holds": a.description} for k, a in spec.arrays.items()},
                     "at_least_k_cases": list(spec.count_keys),
                     **({} if spec.counts_sent else {"noised": "differential privacy (dp-query-noise-multiplier)"}),
                     **({"withheld": "not sent: the query phases are noised"}
                        if noised and kind in WITHHELD_WHEN_NOISED else {})}
    return out


def run_plan(run_config: RunConfig | Mapping[str, Any], profile: Profile, code: str | None = None) -> dict[str, Any]:
    """The plan of a run with this (complete) run config; raises RunConfigError on a bad value."""
    run = run_config if isinstance(run_config, RunConfig) else parse(run_config)
    return {"schema": PLAN_SCHEMA, "code_sha256": code or code_sha256(), "run_config": run.site_facing(),
            "profile": {"name": profile.name, "version": profile.version, "sha256": profile.sha256},
            "protocol": PROTOCOL_VERSION, "messages": messages(run.dp_query_noise_multiplier > 0)}


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
    clinical = plan["run_config"].get("model-covariates")
    if clinical:
        lines += ["", f"The model takes these columns of your manifest as inputs: {clinical}. The values stay here;",
                  "sums over each level's training cases (0 or at least k each) leave in the moments,",
                  "correlation and training replies."]
    held = (f"k = {k} at this site (the run asks {run_k}, this site's own floor is {site_k})" if site_k
            else f"k = {k}")
    lines += ["", f"What would leave this site (each statistic over at least {held}; arrays sized by the agreed",
              "feature counts, never by the number of cases; and no combination of what the site ever released",
              "singles out fewer than k patients: docs/privacy.md, the release rule):"]
    for kind, spec in plan["messages"].items():
        note = (" (noised: differential privacy)" if spec.get("noised")
                else " (withheld)" if spec.get("withheld") else "")
        lines.append(f"  {kind}{note}")
        for key, text in {**spec["config"], **spec["metrics"]}.items():
            lines.append(f"    {key}: {text}")
        for key, arr in spec["arrays"].items():
            lines.append(f"    {key} {tuple(arr['shape'])}: {arr['holds']}")
    return "\n".join(lines)


# Knobs that change which of a site's cases are summed together: the release rule judges them at each site.
CASE_SET_KEYS = ("test-fraction", "split-seed", "combat-covariates", "model-covariates", "internal-validation",
                 "cv-folds", "cv-repeats", "external-validation", "local-only", "min-cases-per-class")


def _value(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What changed from plan ``old`` to plan ``new``, one sentence per change, for the person who approves it:
    the code, the profile, the protocol, each run-config setting (saying when it changes which cases are summed
    together), and each message type or reply field added, removed or reshaped. [] when the plans are the same."""
    out = []
    if old.get("code_sha256") != new.get("code_sha256"):
        out.append(f"The radfed code differs (sha256 {str(old.get('code_sha256'))[:12]} -> "
                   f"{str(new.get('code_sha256'))[:12]}): another version of the software; ask the coordinator "
                   "which release and what changed in it.")
    po, pn = old.get("profile") or {}, new.get("profile") or {}
    if po != pn:
        out.append(f"The extraction profile differs: {po.get('name')} v{po.get('version')} "
                   f"({str(po.get('sha256'))[:12]}) -> {pn.get('name')} v{pn.get('version')} "
                   f"({str(pn.get('sha256'))[:12]}): other features are computed from your images.")
    if old.get("protocol") != new.get("protocol"):
        out.append(f"The message protocol differs: {old.get('protocol')} -> {new.get('protocol')}.")
    ro, rn = old.get("run_config") or {}, new.get("run_config") or {}
    for key in sorted(set(ro) | set(rn)):
        if key in ro and key in rn and ro[key] == rn[key]:
            continue
        if key not in ro:
            change = f"{key} is new, set to {_value(rn[key])}"
        elif key not in rn:
            change = f"{key} ({_value(ro[key])}) is gone"
        else:
            change = f"{key} changed from {_value(ro[key])} to {_value(rn[key])}"
        why = (": this changes which of your cases are summed together (the release rule checks it at your site "
               "before anything leaves)") if key in CASE_SET_KEYS else ""
        out.append(f"{change}{why}.")
    mo, mn = old.get("messages") or {}, new.get("messages") or {}
    for kind in sorted(set(mo) | set(mn)):
        if kind not in mo:
            out.append(f"New message type {kind}: your site would also send {', '.join(_fields(mn[kind])) or 'it'}.")
        elif kind not in mn:
            out.append(f"Message type {kind} is no longer sent.")
        elif mo[kind] != mn[kind]:
            fo, fn = _fields(mo[kind]), _fields(mn[kind])
            parts = [f"adds {', '.join(sorted(set(fn) - set(fo)))}" if set(fn) - set(fo) else "",
                     f"drops {', '.join(sorted(set(fo) - set(fn)))}" if set(fo) - set(fn) else "",
                     f"changes {', '.join(sorted(k for k in set(fo) & set(fn) if fo[k] != fn[k]))}"
                     if any(fo[k] != fn[k] for k in set(fo) & set(fn)) else ""]
            out.append(f"Message type {kind} " + ("; ".join(p for p in parts if p) or "changes its k rules") + ".")
    return out


def _fields(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A message's reply fields: config and metric keys (their descriptions) and arrays (shape and meaning)."""
    return {**spec.get("config", {}), **spec.get("metrics", {}), **spec.get("arrays", {})}

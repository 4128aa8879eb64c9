"""Which run plans this site approved: a local, append-only ``approvals.jsonl`` in the site's work folder.

Each line is one decision (approve or revoke) for one plan hash; the latest decision for a hash holds.
Every message of a run is checked against it before any data is read (``approval_check``, a client mod).
"""

from __future__ import annotations

import getpass
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from client import runcache
from client.site import SiteError, site_files, site_settings
from client.steps import locate_site, run_config
from common.canon import sha256_json
from common.plan import code_files, plan_sha256, run_plan
from common.profile import load_profile, resolve_profile_path
from common.runconfig import RunConfig

log = logging.getLogger("flwr.radfed.client")


class NotApproved(SiteError):
    """The run's plan is not approved at this site; the message names the hash and the command."""


def approvals_file(site_dir: Path) -> Path:
    return site_files(site_dir).approvals


def decide(site_dir: Path, plan_hash: str, action: str, note: str = "") -> dict[str, str]:
    """Append one decision ("approve" or "revoke") for a plan hash; returns the line written."""
    if action not in ("approve", "revoke"):
        raise ValueError(f"unknown action {action!r}")
    if len(plan_hash) != 64 or any(c not in "0123456789abcdef" for c in plan_hash):
        raise SiteError(f"{plan_hash!r} is not a plan hash: copy the 64 hex digits 'radfed site plan show' prints")
    entry = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "action": action,
             "plan_sha256": plan_hash, "by": getpass.getuser(), "note": note}
    path = approvals_file(site_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
    return entry


def decisions(site_dir: Path) -> dict[str, dict[str, str]]:
    """The latest decision per plan hash (read again whenever the file changed: client.runcache)."""
    path = approvals_file(site_dir)
    return runcache.remember("approvals", str(path), lambda: _read_decisions(path), lambda _: [path])


def _read_decisions(path: Path) -> dict[str, dict[str, str]]:
    latest: dict[str, dict[str, str]] = {}
    if path.exists():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                entry = json.loads(line)
                latest[entry["plan_sha256"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SiteError(f"{path} line {number} is not an approval record ({exc}); the file is append-only: "
                                "restore it from backup or remove the damaged line deliberately") from None
    return latest


def is_approved(site_dir: Path, plan_hash: str) -> bool:
    entry = decisions(site_dir).get(plan_hash)
    return entry is not None and entry["action"] == "approve"


def site_plan(run: RunConfig) -> dict:
    """The plan of the run this site is asked to take part in, computed from the code and config it runs; made
    again when the config, the profile file or any code file changes (client.runcache)."""
    return runcache.remember("plan", sha256_json(run.as_dict()), lambda: run_plan(run, load_profile(run.profile)),
                             lambda _: [resolve_profile_path(run.profile), *code_files()])


def pending_plans(site_dir: Path) -> list[Path]:
    """Plans of runs this site refused, kept for review (``<work_dir>/plans/<hash>.json``)."""
    folder = site_files(site_dir).plans
    return sorted(folder.glob("*.json")) if folder.exists() else []


def check_approved(site_dir: Path, values: RunConfig | Mapping[str, Any]) -> tuple[str, str]:
    """(plan hash, "approved" or "off"); raises NotApproved naming the hash and the command to approve it.

    A refused plan is saved under ``<work_dir>/plans/`` so the administrator can review exactly that plan."""
    plan = site_plan(run_config(values))
    plan_hash = plan_sha256(plan)
    settings = site_settings(site_dir)
    if not settings.get("require_approval", True):
        log.warning("Site %s runs plan %s WITHOUT approval (require_approval: false in site.yaml): development "
                    "only", settings.get("name", site_dir.name), plan_hash[:12])
        return plan_hash, "off"
    if not is_approved(site_dir, plan_hash):
        name = settings.get("name", site_dir.name)
        revoked = decisions(site_dir).get(plan_hash, {}).get("action") == "revoke"
        saved = site_files(site_dir).plan(plan_hash)
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(plan, indent=2, sort_keys=True), encoding="utf-8")
        raise NotApproved(
            f"run plan not approved: site {name} has {'revoked' if revoked else 'not approved'} run plan {plan_hash}; "
            f"no data was read. Review it at the site with: radfed site plan show {plan_hash} --site {site_dir}; "
            f"approve it with: radfed site approve {plan_hash} --site {site_dir}")
    return plan_hash, "approved"


def approval_check(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: refuse every message of a run whose plan this site has not approved, before the handler
    (and so before any data) runs."""
    run = run_config(context.run_config)
    check_approved(locate_site(context.node_config, run), run)
    return call_next(msg, context)

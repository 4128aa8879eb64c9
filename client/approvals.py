"""Which run plans this site approved: a local, append-only ``approvals.jsonl`` in the site's work folder.

Each line is one decision (approve or revoke) for one plan hash; the latest decision for a hash holds.
Every message of a run is checked against it before any data is read (``approval_check``, a client mod).
"""

from __future__ import annotations

import functools
import getpass
import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from client import runcache
from client.site import SiteError, site_files, site_settings
from client.sitefiles import read_jsonl
from client.steps import locate_site, run_config
from common.canon import sha256_json
from common.plan import APP_ROOT, code_files, plan_sha256, run_plan
from common.profile import load_profile, resolve_profile_path
from common.protocol import not_approved_reason
from common.runconfig import RunConfig

log = logging.getLogger("flwr.radfed.client")


class NotApproved(SiteError):
    """The run's plan is not approved at this site; the message names the hash and the command."""


def approvals_file(site_dir: Path) -> Path:
    return site_files(site_dir).approvals


def decide(site_dir: Path, plan_hash: str, action: str, note: str = "") -> dict[str, Any]:
    """Append one decision ("approve" or "revoke") for a plan hash; returns the line written, with
    ``changed`` True. Approving a plan that is approved, or revoking one that is revoked, writes nothing and
    returns the standing decision with ``changed`` False. Revoking a plan never approved here is refused: it is
    refused anyway, and the administrator probably meant another hash."""
    if action not in ("approve", "revoke"):
        raise ValueError(f"unknown action {action!r}")
    if len(plan_hash) != 64 or any(c not in "0123456789abcdef" for c in plan_hash):
        raise SiteError(f"{plan_hash!r} is not a plan hash: copy the 64 hex digits 'radfed site plan show' prints")
    standing = decisions(site_dir).get(plan_hash)
    if standing is not None and standing["action"] == action:
        return {**standing, "changed": False}
    if standing is None and action == "revoke":
        raise SiteError(f"run plan {plan_hash} was never approved at {site_dir}: nothing to revoke (a plan that is "
                        f"not approved is refused anyway). The approved plans: radfed site approvals --site {site_dir}")
    entry = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "action": action,
             "plan_sha256": plan_hash, "by": getpass.getuser(), "note": note}
    path = approvals_file(site_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
    return {**entry, "changed": True}


def history(site_dir: Path) -> list[dict[str, str]]:
    """Every decision in the order it was made (the approvals file, validated line by line)."""
    return _read_history(approvals_file(site_dir))


def _is_decision(entry: dict[str, Any]) -> bool:
    return entry.get("action") in ("approve", "revoke") and isinstance(entry.get("plan_sha256"), str)


def _read_history(path: Path) -> list[dict[str, str]]:
    return read_jsonl(path, _is_decision, "an approval record (action and plan hash)",
                      "the file is append-only: restore it from backup or remove the damaged line deliberately")


def decisions(site_dir: Path) -> dict[str, dict[str, str]]:
    """The latest decision per plan hash (read again whenever the file changed: client.runcache)."""
    path = approvals_file(site_dir)
    return runcache.remember("approvals", str(path),
                             lambda: {entry["plan_sha256"]: entry for entry in _read_history(path)}, lambda _: [path])


def is_approved(site_dir: Path, plan_hash: str) -> bool:
    entry = decisions(site_dir).get(plan_hash)
    return entry is not None and entry["action"] == "approve"


def site_plan(run: RunConfig) -> dict:
    """The plan of the run this site is asked to take part in, computed from the code and config it runs; made
    again when the config, the profile file or any code file changes (client.runcache)."""
    return _plan_and_hash(run)[0]


@functools.lru_cache(maxsize=64)
def _run_key(run: RunConfig) -> str:
    return sha256_json(run.as_dict())  # a RunConfig is frozen: its hash never changes


def _plan_and_hash(run: RunConfig) -> tuple[dict, str]:
    """The site's plan and its hash, kept together: every message checks the hash, which is computed once.

    Made again when the profile file or a code file this process has not imported changes (client.runcache), or
    when a module it had imported is no longer the same module object or was reloaded (``importlib.reload`` gives it
    a new spec): either may run a changed file.
    A module's file once imported is not stamped: the process runs the code it imported, so a later change to the
    file cannot change what this process executes (docs/architecture.md, "Run plans and approvals")."""
    def make() -> tuple[tuple[dict, str], tuple[tuple[str, ModuleType, ModuleSpec], ...]]:
        loaded = imported_modules(code_files())  # before hashing: their code in memory is what was hashed or older
        plan = run_plan(run, load_profile(run.profile))
        return (plan, plan_sha256(plan)), loaded

    def watch(made: tuple[object, tuple[tuple[str, ModuleType, ModuleSpec], ...]]) -> list[Path]:
        loaded = {Path(spec.origin).resolve() for _, _, spec in made[1]}  # each is its file (imported_modules)
        return [resolve_profile_path(run.profile), *(p for p in code_files() if p not in loaded)]

    kept, _ = runcache.remember("plan", _run_key(run), make, watch,
                                valid=lambda made: all(sys.modules.get(name) is module and module.__spec__ is spec
                                                       for name, module, spec in made[1]))
    return kept


def _module_stem(path: Path) -> str:
    """``APP_ROOT/client/app`` for ``client/app.py``, ``APP_ROOT/client`` for ``client/__init__.py``."""
    return str(path.parent if path.name == "__init__.py" else path.with_suffix(""))


def imported_modules(files: list[Path]) -> tuple[tuple[str, ModuleType, ModuleSpec], ...]:
    """(name, module, its spec) of every one of ``files`` that this process has imported from exactly that source
    file."""
    found = []
    for path in files:
        if path.suffix != ".py":
            continue  # profiles are read at run time
        rel = Path(_module_stem(path)).relative_to(APP_ROOT)
        name = ".".join(rel.parts)
        module = sys.modules.get(name)
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if module is not None and origin and Path(origin).resolve() == path:
            found.append((name, module, spec))
    return tuple(found)


def pending_plans(site_dir: Path) -> list[Path]:
    """Plans of runs this site refused, kept for review (``<work_dir>/plans/<hash>.json``)."""
    folder = site_files(site_dir).plans
    return sorted(folder.glob("*.json")) if folder.exists() else []


def known_plans(site_dir: Path) -> list[dict[str, Any]]:
    """Every plan this site has seen or decided on, newest decision first: its hash, state ("approve",
    "revoke" or "not approved"), when and by whom it was decided, the note, and the saved plan file if the
    site refused it once (the coordinator's run asked before approval)."""
    saved = {p.stem: p for p in pending_plans(site_dir)}
    decided = decisions(site_dir)
    rows = []
    for plan_hash in sorted(set(saved) | set(decided), key=lambda h: decided.get(h, {}).get("time", ""),
                            reverse=True):
        entry = decided.get(plan_hash, {})
        rows.append({"plan_sha256": plan_hash, "state": entry.get("action", "not approved"),
                     "time": entry.get("time"), "by": entry.get("by"), "note": entry.get("note", ""),
                     "plan_file": str(saved[plan_hash]) if plan_hash in saved else None})
    return rows


def check_approved(site_dir: Path, values: RunConfig | Mapping[str, Any]) -> tuple[str, str]:
    """(plan hash, "approved" or "off"); raises NotApproved naming the hash and the command to approve it.

    A refused plan is saved under ``<work_dir>/plans/`` so the administrator can review exactly that plan."""
    plan, plan_hash = _plan_and_hash(run_config(values))
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
        raise NotApproved(not_approved_reason(str(name), revoked, plan_hash, str(site_dir)))
    return plan_hash, "approved"


def approval_check(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: refuse every message of a run whose plan this site has not approved, before the handler
    (and so before any data) runs."""
    run = run_config(context.run_config)
    # once per message or batch: the approvals it reads are stamped once per look anyway (client.runcache), so a
    # batch's sub-requests would only repeat it; a refusal is not kept, each sub-request raises it again
    runcache.in_look(("approved", id(context)), context,
                     lambda: check_approved(locate_site(context.node_config, run), run))
    return call_next(msg, context)

"""When a site answers the features request that rides with the plan query (``merge-phases``).

With merge-phases on, the coordinator sends the features request in the same message as the plan query, before it
has read any plan reply. A site the plan phase would drop must not send its feature names, so a features request
that names the run's plan (plan, profile and protocol as the plan query named them) is answered only when the
coordinator will accept this site's plan reply by its own rules (``server/phases.py`` ``plan_phase``): the same
protocol, the same run plan hash (the code and run config this site runs), the same profile, and eligible here
(enough cases, a split the release rule allows). Otherwise the site refuses the request, saying why, and sends
nothing of it. A request that names no plan (a coordinator asking after the plan phase) is answered as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from client import steps
from client.approvals import check_approved
from client.site import SiteError
from common.protocol import PROTOCOL_VERSION
from common.runconfig import RunConfig

# what the plan query names, and the features request with it
NAMED = ("protocol", "plan-sha256", "profile-sha256")


def require_plan_accepted(site_dir: Path, run: RunConfig, request: Mapping[str, object]) -> None:
    """Raise SiteError unless the coordinator will keep this site after the plan phase of the plan ``request``
    names (nothing to check when it names none)."""
    named = {key: str(request[key]) for key in NAMED if key in request}
    if not named:
        return
    plan_hash, _ = check_approved(site_dir, run)
    config, _ = steps.plan_reply(site_dir, run)
    own = {"protocol": PROTOCOL_VERSION, "plan-sha256": plan_hash, "profile-sha256": str(config["profile-sha256"])}
    differs = [key for key, value in named.items() if own[key] != value]
    if differs:
        raise SiteError(f"site {config['site-name']} does not answer the features request: its {', '.join(differs)} "
                        "differs from the run plan's, so the plan phase does not admit it")
    if config["status"] != "ok":
        raise SiteError(f"site {config['site-name']} does not answer the features request: {config['reason']}")

"""What a site agreed to per cohort (the main federation, or a fold): the name lists the server sends and the site
checks against their hashes, kept in ``context.state`` for the privacy guard (client.guard), which checks every
array's shape against them before a reply leaves."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message

from client import nodestate, shared, steps
from client.guard import agreed_names, keep_names, site_state_key
from client.site import SiteError


def cohort(msg: Message) -> str:
    """The cohort a message belongs to: "" for the main federation, else a fold (e.g. the held-out site)."""
    return str(msg.content["config"].get("fold", ""))  # type: ignore[union-attr]


def record(context: Context, msg: Message) -> ConfigRecord:
    """What the site agreed to for the message's cohort: each fold keeps its own (folds run interleaved)."""
    key = site_state_key(cohort(msg))
    kept = context.state.get(key)
    if not isinstance(kept, ConfigRecord):
        kept = ConfigRecord()
        context.state[key] = kept
    return kept


def accept(context: Context, msg: Message, key: str, state_key: str) -> list[str]:
    """Take a name list from the server, check it against its hash, and remember it for the guard (a copy: the
    caller may change it)."""
    config = msg.content["config"]
    sent, claimed = config[key], str(config[f"{key}-sha256"])  # type: ignore[index]

    def checked() -> tuple[list[str], str]:
        names = [str(n) for n in sent]  # type: ignore[union-attr]
        digest = steps.names_sha256(names)
        if digest != claimed:
            raise SiteError(f"the {key} list from the server does not match its hash; restart the run")
        return names, digest

    # every fold's request of a batch carries the same list (860 names for moments): copied and hashed once per type
    # and batch, a later request's list compared with the checked one (equal lists have equal hashes)
    names, digest = shared.once(msg, "names", (key, claimed), checked, lambda kept: kept[0] == sent)
    keep_names(nodestate.of(context), record(context, msg), state_key, names, digest)
    return list(names)


def selected(context: Context, msg: Message) -> list[str]:
    """The model's inputs the last train/evaluate/newton message of this cohort named."""
    return agreed_names(nodestate.of(context), record(context, msg), "selected") or []


def agreed(context: Context, msg: Message, default: list[str] | None = None) -> list[str]:
    """The feature list the cohort agreed (``default`` when it agreed none; raises without a default)."""
    names = agreed_names(nodestate.of(context), record(context, msg), "features")
    if names is None and default is not None:
        return default
    if names is None:
        raise SiteError("this site holds no agreed feature list for the run (it missed a phase); restart the run")
    return names

"""Who takes part in a run and how the coordinator talks to them.

``Run`` is what every phase needs and never changes during a run (grid, config, audit log, run folder,
profile, DP account). ``Cohort`` is the set of sites one model is fitted on: the whole federation, a
leave-one-site-out fold's training sites, or one site alone for the local-only baseline. Every phase takes
``(run, cohort, ...)``: a fold is the same pipeline on a smaller cohort, never a second code path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from common import dp, dp_query
from common.canon import sha256_json
from common.profile import Profile
from common.runconfig import RunConfig
from server import merging
from server.audit import AuditLog

log = logging.getLogger("flwr.radfed.server")


class RunRefused(RuntimeError):
    """The run cannot go on; the message says which site and what to fix."""


class LinkLost(RuntimeError):
    """Every site of a query got an error the SuperLink made in its place (not a ``RunRefused``: no fold or
    comparison goes on without its sites; the run ends ``failed``)."""


# errors Flower's SuperLink writes in a site's place (Flower 1.42, linkstate/utils.py): the node sent no heartbeat
# for 2 x its interval, or the message or its reply is no longer in the SuperLink's store
SUPERLINK_MADE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


@dataclass
class Federation:
    """The sites admitted so far (node id -> site name) and what they reported."""

    sites: dict[int, str]
    min_sites: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped: list[dict[str, object]] = field(default_factory=list)

    def drop(self, audit: AuditLog, node_id: int, phase: str, reason: str, server_round: int | None = None) -> None:
        site = self.sites.pop(node_id, f"node {node_id}")
        where = f"round {server_round} ({phase})" if server_round is not None else f"the {phase} phase"
        log.warning("Site %s leaves the run at %s: %s", site, where, reason)
        record = {"site": site, "phase": phase, "round": server_round, "reason": reason}
        self.dropped.append(record)
        audit.append("dropout", **record)

    def require_enough(self, where: str) -> None:
        if len(self.sites) < self.min_sites:
            raise RunRefused(f"only {len(self.sites)} site(s) remain after {where}, fewer than "
                             f"min-sites = {self.min_sites}; see the audit log for why the others left")

    def subset(self, names: set[str]) -> Federation:
        """The admitted sites among ``names``, as a federation of their own (a fold's training sites)."""
        return Federation({nid: s for nid, s in self.sites.items() if s in names}, min_sites=1)


@dataclass
class FeatureAgreement:
    """The features every site of a cohort has finite at all its cases, and the cohort's class weight."""

    names: list[str]
    sha256: str
    pos_weight: float
    split_counts: dict[str, dict[str, int]]
    site_features: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, site_features: dict[str, frozenset[str]],
           split_counts: dict[str, dict[str, int]]) -> FeatureAgreement:
        """Intersect the sites' feature lists; class weight = BM/HGG training cases over these sites."""
        common = frozenset.intersection(*site_features.values()) if site_features else frozenset()
        agreed = sorted(common)
        n_hgg = sum(c["n-train-hgg"] for c in split_counts.values())
        n_bm = sum(c["n-train-bm"] for c in split_counts.values())
        return cls(agreed, sha256_json(agreed), n_bm / max(n_hgg, 1), dict(split_counts), dict(site_features))

    def restricted(self, sites: set[str]) -> FeatureAgreement:
        """The agreement the ``sites`` alone would reach: a held-out site's feature list and counts take no
        part (its data must not shape a fold it is tested on)."""
        return FeatureAgreement.of({s: f for s, f in self.site_features.items() if s in sites},
                                   {s: c for s, c in self.split_counts.items() if s in sites})


@dataclass
class Run:
    """What every phase of one run needs; fixed from run start to run end."""

    grid: Grid
    config: RunConfig
    audit: AuditLog
    folder: Path
    profile: Profile
    dp_account: dp.DPAccount | None = None
    query_account: dp_query.QueryAccount | None = None  # noised query releases (dp-query-noise-multiplier > 0)
    training_started: bool = False  # a stop before the first model is sent is a refused run, after it a failed one
    # replies fetched ahead of their query (merge-phases, server/merging.py); shared by the folds' copies of the run,
    # whose requests differ by their fold tag
    prefetched: merging.Prefetched = field(default_factory=merging.Prefetched)

    @property
    def timeout(self) -> float:
        return self.config.query_timeout


@dataclass
class Cohort:
    """The sites one model is fitted on. ``fold`` names the leave-one-site-out fold (its held-out site) or
    the local-only baseline (``local:<site>``); "" is the main federation. Every message a cohort sends
    carries its fold, so a site keeps each fold's fitted state (ComBat parameters) apart."""

    fed: Federation
    agreement: FeatureAgreement
    fold: str = ""

    @property
    def tag(self) -> dict[str, str]:
        return {"fold": self.fold} if self.fold else {}

    riders: list[merging.Rider] = field(default_factory=list, compare=False, repr=False)

    def ask(self, run: Run, phase: str, message_type: str, config: dict,
            per_node: Callable[[int], RecordDict] | None = None, server_round: int | None = None) -> dict[int, Message]:
        """One query to every site of the cohort; the good replies by node id. A site that fails or does not
        answer is dropped (and named); the run stops if too few remain. Requests deferred or prefetched on this
        cohort (``defer``, ``prefetch``) go in the same round trip."""
        messages = build(list(self.fed.sites), message_type, {**config, **self.tag}, per_node, packed(run.grid))
        sent = merging.exchange(run.grid, messages, run.timeout, self.riders, run.prefetched)
        return self._receive(run, phase, message_type, sent, server_round)

    def defer(self, run: Run, phase: str, message_type: str, config: dict,
              per_node: Callable[[int], RecordDict] | None, done: Callable[[dict[int, Message]], None]) -> None:
        """A query that goes out with this cohort's next one (merge-phases) and is read just before it, as if it
        had been sent on its own: ``done`` gets its good replies. Without merge-phases it is sent now."""
        if not run.config.merge_phases:
            done(self.ask(run, phase, message_type, config, per_node))
            return
        messages = build(list(self.fed.sites), message_type, {**config, **self.tag}, per_node, packed(run.grid))
        self.riders.append(merging.Rider(messages, lambda sent: done(
            self._receive(run, phase, message_type, sent, None))))

    def prefetch(self, run: Run, message_type: str, config: dict,
                 per_node: Callable[[int], RecordDict] | None = None) -> None:
        """Send, with this cohort's next query, a request a later query will make (merge-phases): that query then
        takes these replies instead of asking again, if it asks exactly this. Off without merge-phases."""
        if run.config.merge_phases:
            messages = build(list(self.fed.sites), message_type, {**config, **self.tag}, per_node, packed(run.grid))
            self.riders.append(run.prefetched.rider(messages))

    def _receive(self, run: Run, phase: str, message_type: str, sent: dict[int, Message],
                 server_round: int | None) -> dict[int, Message]:
        good = replies_of(self.fed, run.audit, phase, sent, server_round)
        if run.query_account is not None and message_type in dp_query.MECHANISMS:  # each arrival is spent
            run.query_account.add(message_type, [self.fed.sites[nid] for nid in good])
        where = f"the {phase} phase" if server_round is None else f"{phase} round {server_round}"
        self.fed.require_enough(where + (f" of fold {self.fold}" if self.fold else ""))
        return good


def error_reason(reply: Message) -> str:
    """The site's own error message, without the simulation's traceback wrapping."""
    reason = str(reply.error.reason)
    if "Message: " in reason:  # simulation: "Exception ClientAppException occurred. Message: <text>"
        reason = reason.rsplit("Message: ", 1)[1]
    elif reason.startswith("<class '") and ":<'" in reason:  # deployment: "<class 'X'>:<'<text>'>"
        reason = reason.split(":<'", 1)[1]
    return reason.strip().removesuffix("'>").strip()


# Seconds no new site may join before the run goes on with those connected (at least min-sites): sites started
# together all get in. Flower's simulation registers every node in one go before its ClientApps start
# (flwr/server/superlink/fleet/vce/vce_api.py, ``_register_nodes``), so there a short look suffices.
JOIN_GRACE, JOIN_GRACE_SIMULATION = 1.0, 0.1


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float, grace: float = JOIN_GRACE) -> list[int]:
    """Node ids once at least ``min_nodes`` are connected and none has joined for ``grace`` seconds (or at
    ``timeout``, if at least ``min_nodes`` are there by then); refused with fewer at ``timeout``."""
    start = time.monotonic()
    seen, since = sorted(grid.get_node_ids()), start
    while True:
        now = time.monotonic()
        if len(seen) >= min_nodes and (now - since >= grace or now - start >= timeout):
            return seen
        if now - start >= timeout:
            raise RunRefused(f"only {len(seen)} site(s) connected within {timeout:.0f}s, fewer than "
                             f"min-sites = {min_nodes}")
        time.sleep(min(max(grace / 2, 0.01), 0.5))  # a look every half grace, at least 10 ms apart
        ids = sorted(grid.get_node_ids())
        if ids != seen:
            seen, since = ids, time.monotonic()


def build(node_ids: list[int], message_type: str, config: dict,
          per_node: Callable[[int], RecordDict] | None = None, packed: bool = False) -> list[Message]:
    """One message per node: ``config`` for every node, plus the records ``per_node(node_id)`` holds for that node.
    ``packed``: the grid sends every request inside a ``query.batch`` (the folds' grid), so each is a
    ``merging.Request`` (the same records) rather than a Flower ``Message`` of its own."""
    shared = ConfigRecord(config)  # Flower checks every value, each list item by item, once per call: not per node
    messages: list[Message] = []
    make = merging.Request if packed else Message
    for nid in node_ids:
        content = per_node(nid) if per_node else RecordDict()
        if not isinstance(content, RecordDict):
            raise TypeError(f"per_node({nid}) gave a {type(content).__name__}, not a RecordDict")
        # Flower's internal ``_data`` dict, as common/batch.py: ``content.get`` raises and catches a KeyError per
        # node when there is no "config", and ``content["config"] = ...`` checks a record built just here
        data = content.__dict__["_data"]
        data["config"] = _with(shared, data.get("config"))
        messages.append(make(content, dst_node_id=nid, message_type=message_type))  # type: ignore[arg-type]
    return messages


def packed(grid: Grid) -> bool:
    """Whether ``grid`` sends every request packed in a ``query.batch`` (``server.folds.FoldGrid``)."""
    return getattr(grid, "packs_every_request", False)


def _with(shared: ConfigRecord, own: ConfigRecord | None) -> ConfigRecord:
    """A node's own copy of ``shared`` with its ``own`` values over it: what ``ConfigRecord({**shared, **own})``
    holds, without checking the values again for every node: Flower checked both records' values as they were built
    (a fold's moments request lists its ~860 agreed features; 47 folds x 48 sites of them at 48 sites). A new record,
    so a ``per_node`` that hands out one record for every node never sees another's. Flower's internal ``_data``
    dict, as server/folds.py sets a message id."""
    record = ConfigRecord()
    record.__dict__["_data"] = {**shared.__dict__["_data"], **(own.__dict__["_data"] if own is not None else {})}
    return record


def query(grid: Grid, node_ids: list[int], message_type: str, config: dict, timeout: float,
          per_node: Callable[[int], RecordDict] | None = None) -> dict[int, Message]:
    """Send one query to every node; replies by node id (a node that did not answer is absent).

    ``config`` goes to every node; ``per_node(node_id)`` adds records meant for that node only.
    """
    messages = build(node_ids, message_type, config, per_node)
    return merging.by_site(messages, grid.send_and_receive(messages, timeout=timeout))


def failure_reason(reply: Message) -> str:
    """Why a site's reply is an error: the site's own message, or what the SuperLink says in its place."""
    if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
        return f"the site went offline: its SuperNode stopped or lost its connection ({error_reason(reply)})"
    if reply.error.code in SUPERLINK_MADE:  # the message or its reply expired in the SuperLink's store
        return f"its reply was lost ({error_reason(reply)})"
    return error_reason(reply)


def require_link(fed: Federation, replies: dict[int, Message], where: str) -> None:
    """Raise LinkLost when two or more sites were asked and every one's reply is an error the SuperLink made in its
    place: the sites did not all leave at the same instant, the coordinator lost them (a SuperLink that stops stops
    taking heartbeats first and, ~60 s later, reports every node offline, possibly before the ServerApp's own stop
    signal). One site alone cannot tell the two apart: it is dropped as any failing site."""
    codes = [replies[n].error.code if n in replies and replies[n].has_error() else None for n in fed.sites]
    if len(codes) >= 2 and all(c in SUPERLINK_MADE for c in codes):
        reason = failure_reason(replies[next(iter(fed.sites))])
        raise LinkLost(f"every site's reply to {where} came from the SuperLink in its place ({reason}): the "
                       "SuperLink stopped or restarted, or the network between it and the sites is down, and a "
                       "SuperLink does not resume runs; once `radfed status` shows the sites online, start a new run")


def replies_of(fed: Federation, audit: AuditLog, phase: str, replies: dict[int, Message],
               server_round: int | None = None) -> dict[int, Message]:
    """The good replies by node id; every admitted site that failed or did not answer is dropped (and named).
    Every site's reply made by the SuperLink in its place stops the run (``require_link``)."""
    require_link(fed, replies, f"the {phase} phase" if server_round is None else f"{phase} round {server_round}")
    good = {}
    # by site name, not node id (which changes from run to run): sums over sites then add in the same order,
    # so the same data gives a bit-identical model
    for node_id in sorted(fed.sites, key=lambda nid: (fed.sites[nid], nid)):
        reply = replies.get(node_id)
        if reply is None:
            fed.drop(audit, node_id, phase, "no reply before the timeout", server_round)
        elif reply.has_error():
            fed.drop(audit, node_id, phase, failure_reason(reply), server_round)
        else:
            good[node_id] = reply
    return good

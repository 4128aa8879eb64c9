"""Query phases that travel in one message (``merge-phases``): fewer round trips for the same requests.

Two kinds of request can ride along with a cohort's next query, because nothing in them waits for that query's
replies:

- a **deferred** request, whose replies are read just before the next query's (e.g. a held-out site joining a
  fold's harmonisation, then scoring the fold's model: ``harmonization.join_phase``);
- a **prefetched** request, sent early; its replies are kept, by site and by the request's exact content, and
  the later query that sends exactly that request takes them instead of sending it (e.g. exact training's first
  Newton round with the histograms, the calibration fit's first round with the final evaluation). A request
  whose content changed in between (a site left, so ComBat's design changed) no longer matches and is sent anew.

Either way each request is still read, checked and audited at its own place in the run, in the same order, so a
run gives the same results and audit entries with merging on or off (``tests/test_merge_phases.py``); only the
number of Flower messages changes. The site answers each request on its own: several requests to one site
travel as one ``query.batch`` (``common.batch``), which the site splits before its mod stack (``client.batch``),
so every sub-reply passes the approval check, DP mods, privacy guard, ledger and outbox as a message of its own.
``PackingGrid`` packs them on the run's grid; under ``fold-batching`` the folds' coordinator packs them with
every other fold's requests (``server.folds``).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, Error, Message, RecordDict
from flwr.serverapp import Grid

from common import batch
from common.canon import arrays_sha256


class Meta:
    """What a packed request (``Request``) or its reply (``Reply``) carries of a Flower ``Metadata``: the fields
    ``common.batch.pack``, the folds' coordinator and the phases read."""

    __slots__ = ("dst_node_id", "src_node_id", "message_type", "message_id", "group_id", "reply_to_message_id")

    def __init__(self, dst_node_id: int, message_type: str, message_id: str = "", group_id: str = "",
                 src_node_id: int = 0, reply_to_message_id: str = "") -> None:
        self.dst_node_id, self.src_node_id, self.message_type = dst_node_id, src_node_id, message_type
        self.message_id, self.group_id, self.reply_to_message_id = message_id, group_id, reply_to_message_id


class Request:
    """A per-node request that only ever travels inside a ``query.batch`` (the folds' grid, ``server.folds``): its
    destination, type, id and records, without a Flower ``Message`` of its own. Flower's constructor stamps the time,
    run, task and node ids and checks every argument, and each such request came back as a reply ``Message`` built
    the same way: 2,256 of each per round in the folds' turns at 48 sites, on the coordinator's one GIL. The batch
    that carries it is Flower's own message, with the same records (``common.batch.pack`` reads exactly these)."""

    __slots__ = ("metadata", "content")

    def __init__(self, content: RecordDict, dst_node_id: int, message_type: str) -> None:
        self.metadata, self.content = Meta(dst_node_id, message_type), content


class Reply:
    """A ``Request``'s answer from its site's batch reply: its records, or the site's error (the ``Message`` fields
    the phases read: ``metadata.src_node_id`` and ``reply_to_message_id``, ``content``, ``error``, ``has_error``)."""

    __slots__ = ("metadata", "content", "error")

    def __init__(self, request: Request, content: RecordDict | None, error: Error | None) -> None:
        meta = request.metadata
        self.metadata = Meta(meta.src_node_id, meta.message_type, "", meta.group_id, src_node_id=meta.dst_node_id,
                             reply_to_message_id=meta.message_id)
        self.content, self.error = content, error

    def has_error(self) -> bool:
        return self.error is not None

    def has_content(self) -> bool:
        return self.content is not None


def fingerprint(message: Message | Request) -> str:
    """What a request asks, exactly: its type and every record (arrays by their hash). Two requests with the same
    fingerprint to the same site get the same answer from it."""
    parts: dict[str, object] = {"type": message.metadata.message_type}
    for name, record in message.content.items():
        if isinstance(record, ArrayRecord):
            parts[name] = arrays_sha256({k: a.numpy() for k, a in record.items()})
        else:  # ConfigRecord / MetricRecord: plain values and lists
            parts[name] = {k: list(v) if isinstance(v, list) else v for k, v in record.items()}
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Rider:
    """Requests that go out with a cohort's next query; ``on_replies`` gets their replies by node id (a site that
    did not answer is absent) before that query's replies are read."""

    messages: list[Message]
    on_replies: Callable[[dict[int, Message]], None]


class Prefetched:
    """Replies fetched ahead of their query, by (site node, request fingerprint); each is taken at most once."""

    def __init__(self) -> None:
        self._held: dict[tuple[int, str], Message] = {}

    def rider(self, messages: list[Message]) -> Rider:
        """A rider whose replies are kept here for the query that will send exactly these requests."""
        keys = {m.metadata.dst_node_id: fingerprint(m) for m in messages}

        def keep(replies: dict[int, Message]) -> None:
            for node, reply in replies.items():
                self._held[(node, keys[node])] = reply

        return Rider(messages, keep)

    def take(self, message: Message) -> Message | None:
        """The reply already fetched for exactly ``message``, or None."""
        if not self._held:
            return None
        return self._held.pop((message.metadata.dst_node_id, fingerprint(message)), None)

    def __len__(self) -> int:
        return len(self._held)


def exchange(grid: Grid, messages: list[Message], timeout: float, riders: list[Rider],
             prefetched: Prefetched | None) -> dict[int, Message]:
    """Send ``messages`` (one per site) with every rider's requests in one ``send_and_receive``; replies of
    ``messages`` by node id. Riders' replies go to their ``on_replies`` first, in the order they were added;
    ``riders`` is emptied. A request whose reply was prefetched is not sent."""
    early = {}
    for m in messages:
        reply = prefetched.take(m) if prefetched is not None else None
        if reply is not None:
            early[m.metadata.dst_node_id] = reply
    own = [m for m in messages if m.metadata.dst_node_id not in early]
    riding = list(riders)
    riders.clear()
    # riders first: a site answers a batch's requests in order, and a deferred join must come before the scoring
    out = [m for r in riding for m in r.messages] + own
    replies = list(grid.send_and_receive(out, timeout=timeout)) if out else []
    for rider in riding:
        rider.on_replies(by_site(rider.messages, replies))
    return {**early, **by_site(own, replies)}


def by_site(requests: Iterable[Message], replies: Iterable[Message]) -> dict[int, Message]:
    """Each request's reply by the node it was sent to; a request with no reply is absent. Found by the request
    a reply answers (the grid gave every request its id as it pushed it), not by the reply's sender: an error the
    SuperLink writes in a site's place (the node went offline, the message expired) comes from the SuperLink's
    own node id, 1, for every site."""
    requests = list(requests)
    ids = {m.metadata.message_id for m in requests}
    if "" in ids or len(ids) != len(requests):  # a grid that did not stamp them: no reply could be told apart
        raise RuntimeError("the grid sent requests without a message id of their own, so no reply can be matched to "
                           "its site: use Flower's grid (it stamps each message as it pushes it)")
    answering = {r.metadata.reply_to_message_id: r for r in replies}
    return {m.metadata.dst_node_id: answering[m.metadata.message_id] for m in requests
            if m.metadata.message_id in answering}


def _requests(message: Message) -> int:
    """The requests one message carries: a batch's sub-requests (the folds' coordinator packs them), else 1."""
    if message.metadata.message_type != batch.BATCH:
        return 1
    return len(list(message.content[batch.INDEX]["ids"]))  # type: ignore[arg-type]


class PackingGrid:
    """The run's grid: several requests to one site in one ``send_and_receive`` travel as one ``query.batch``
    message (``common.batch``); a site with one request gets it as it is. Counts the Flower messages sent (in
    all, and per site) and the requests they carried. Everything else is the wrapped grid's."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.messages, self.requests = 0, 0
        self.per_node: Counter[int] = Counter()

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        nodes = Counter(m.metadata.dst_node_id for m in messages)
        self.messages += len(nodes)
        self.requests += sum(_requests(m) for m in messages)
        self.per_node.update(nodes.keys())
        if all(n == 1 for n in nodes.values()):
            return self._grid.send_and_receive(messages, timeout=timeout)
        single = [m for m in messages if nodes[m.metadata.dst_node_id] == 1]
        shared = [m for m in messages if nodes[m.metadata.dst_node_id] > 1]
        for m in shared:  # a sub-reply names the request it answers by this id
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        batches = batch.pack(shared)
        replies = list(self._grid.send_and_receive(single + [b.message for b in batches], timeout=timeout))
        packed = {b.message.metadata.message_id for b in batches}
        return ([r for r in replies if r.metadata.reply_to_message_id not in packed]
                + list(batch.unpack_replies(batches, replies).values()))

    def counts(self) -> dict[str, object]:
        """What the run sent: Flower messages, the requests they carried, the most and fewest to one site."""
        per = list(self.per_node.values()) or [0]
        return {"messages": self.messages, "requests": self.requests, "sites": len(self.per_node),
                "per_site_max": max(per), "per_site_min": min(per)}

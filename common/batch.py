"""The ``query.batch`` message: several folds' requests to one site in one Flower message, and their replies.

A batch carries sub-requests, each with its own message type (folds converge at different rounds, so one batch
may mix ``train``, ``evaluate`` and queries), id, group id and records (config with the fold tag, arrays). Its
``batch`` ConfigRecord lists them; sub-request j's records travel as ``"<j>/<name>"``. The reply holds each
sub-reply's records the same way, or its error (code and the site's own words). Both sides use this module:
the server packs requests and unpacks replies (``server.folds``), the site unpacks requests and packs replies
(``client.batch``), which splits a batch before the mod stack so every sub-reply passes every check on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

BATCH = "query.batch"
INDEX = "batch"  # the ConfigRecord that lists a batch's sub-requests (or sub-replies)


class BatchError(ValueError):
    """A batch that cannot be read: names what is wrong."""


@dataclass
class Batch:
    """One site's batch: the Flower message sent and the sub-requests it carries, in order."""

    node_id: int
    message: Message
    requests: list[Message]


def _records(content: RecordDict, j: int) -> list[tuple[str, object]]:
    return [(f"{j}/{name}", record) for name, record in content.items()]


_RECORDS = (ArrayRecord, ConfigRecord, MetricRecord)


def _record_dict(items: Iterable[tuple[str, object]]) -> RecordDict:
    """``RecordDict(dict(items))``: the same records under the same names, each checked as Flower checks it (a str
    name, a Flower record), without ``RecordDict.__setitem__``'s look-up of a value to replace (a ``KeyError`` raised
    and caught per record through ``MutableMapping.get``): a 48-site run packs and unpacks ~11,000 sub-requests' and
    sub-replies' records per side, each name new in its RecordDict. Flower's internal ``_data`` dict, as
    server.federation._with and server/folds.py use it."""
    content = RecordDict()
    data = content.__dict__["_data"]
    for name, record in items:
        if not isinstance(name, str) or not isinstance(record, _RECORDS):
            raise TypeError(f"{BATCH}: record {name!r} is a {type(record).__name__}, not a Flower record")
        if name in data:
            raise BatchError(f"{BATCH}: record {name!r} appears twice; nothing was read")
        data[name] = record
    return content


def pack(requests: list[Message]) -> list[Batch]:
    """Per destination site, one ``query.batch`` message carrying its requests in the order given. Every request
    must hold a unique ``message_id`` (the fold's grid gives each one); a sub-reply names it."""
    by_node: dict[int, list[Message]] = {}
    for m in requests:
        by_node.setdefault(m.metadata.dst_node_id, []).append(m)
    batches = []
    for node_id, subs in by_node.items():
        index = ConfigRecord({"ids": [m.metadata.message_id for m in subs],
                              "types": [m.metadata.message_type for m in subs],
                              "groups": [m.metadata.group_id for m in subs],
                              "records": [",".join(m.content.keys()) for m in subs]})
        content = _record_dict([*(item for j, m in enumerate(subs) for item in _records(m.content, j)),
                                (INDEX, index)])
        batches.append(Batch(node_id, Message(content, dst_node_id=node_id, message_type=BATCH), subs))
    return batches


def sub_reply(request: Message, reply: Message, content: RecordDict | None, error: Error | None) -> Message:
    """Flower's reply Message to ``request`` from its site's batch ``reply``: ``content`` or ``error``."""
    meta = Metadata(run_id=reply.metadata.run_id, message_id="", src_node_id=request.metadata.dst_node_id,
                    dst_node_id=request.metadata.src_node_id, reply_to_message_id=request.metadata.message_id,
                    group_id=request.metadata.group_id, created_at=reply.metadata.created_at,
                    ttl=reply.metadata.ttl, message_type=request.metadata.message_type)
    return Message(content=content, metadata=meta) if error is None else Message(error=error, metadata=meta)


def unpack_replies(batches: list[Batch], replies: list[Message],
                   make: Callable[[Any, Message, RecordDict | None, Error | None], Any] = sub_reply) -> dict[str, Any]:
    """Each sub-request's reply by its message id, as ``make(request, batch reply, content, error)`` builds it
    (``sub_reply``: a Flower Message). A batch that came back as an error (the site went offline, its reply was lost)
    gives every sub-request that error; a batch with no reply gives its sub-requests none."""
    by_batch = {r.metadata.reply_to_message_id: r for r in replies}
    out: dict[str, Any] = {}
    for b in batches:
        reply = by_batch.get(b.message.metadata.message_id)
        if reply is None:
            continue
        if reply.has_error():
            for m in b.requests:
                out[m.metadata.message_id] = make(m, reply, None, Error(reply.error.code, reply.error.reason))
            continue
        index = reply.content[INDEX]
        ids, codes, reasons = list(index["ids"]), list(index["error-codes"]), list(index["errors"])  # type: ignore[arg-type]
        names = [str(n).split(",") if n else [] for n in index["records"]]  # type: ignore[union-attr]
        position = {str(i): j for j, i in enumerate(ids)}  # type: ignore[union-attr]
        records = reply.content.__dict__["_data"]  # the records Flower checked as it read the reply, by name
        for m in b.requests:
            j = position.get(m.metadata.message_id)
            if j is None:
                out[m.metadata.message_id] = make(m, reply, None, Error(
                    ErrorCode.REPLY_MESSAGE_UNAVAILABLE, "the site's batch reply holds no answer to this request"))
            elif int(codes[j]):  # type: ignore[call-overload]
                out[m.metadata.message_id] = make(m, reply, None, Error(int(codes[j]), str(reasons[j])))  # type: ignore[call-overload]
            else:
                content = _record_dict((name, records[f"{j}/{name}"]) for name in names[j])
                out[m.metadata.message_id] = make(m, reply, content, None)
    return out


def split(message: Message) -> list[Message]:
    """The sub-requests of a received batch, each a message of its own type and id (at the site)."""
    index = message.content.get(INDEX)
    if not isinstance(index, ConfigRecord) or any(k not in index for k in ("ids", "types", "groups", "records")):
        raise BatchError(f"{BATCH}: the message holds no {INDEX!r} index of its sub-requests; restart the run")
    ids, types = [str(i) for i in index["ids"]], [str(t) for t in index["types"]]  # type: ignore[union-attr]
    groups, names = list(index["groups"]), list(index["records"])  # type: ignore[arg-type]
    if not (len(ids) == len(types) == len(groups) == len(names)) or len(set(ids)) != len(ids) or not all(ids):
        raise BatchError(f"{BATCH}: its index does not give each sub-request one unique id; nothing was read")
    if BATCH in types:
        raise BatchError(f"{BATCH}: a batch may not hold another batch; nothing was read")
    meta = message.metadata
    subs = []
    for j, (sub_id, sub_type) in enumerate(zip(ids, types, strict=True)):
        records = str(names[j]).split(",") if names[j] else []
        content = _record_dict((name, message.content[f"{j}/{name}"]) for name in records)
        subs.append(Message(content=content, metadata=Metadata(
            run_id=meta.run_id, message_id=sub_id, src_node_id=meta.src_node_id, dst_node_id=meta.dst_node_id,
            reply_to_message_id="", group_id=str(groups[j]), created_at=meta.created_at, ttl=meta.ttl,
            message_type=sub_type, src_task_id=meta.src_task_id, dst_task_id=meta.dst_task_id)))
    return subs


def join(message: Message, replies: list[Message]) -> Message:
    """The batch's reply: every sub-reply's records, or its error code and text, in the sub-requests' order."""
    items: list[tuple[str, object]] = []
    codes, reasons, names = [], [], []
    for j, r in enumerate(replies):
        if r.has_error():
            codes.append(int(r.error.code) or int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION))
            reasons.append(str(r.error.reason or ""))
            names.append("")
            continue
        codes.append(0)
        reasons.append("")
        names.append(",".join(r.content.keys()))
        items += _records(r.content, j)
    items.append((INDEX, ConfigRecord({"ids": [r.metadata.reply_to_message_id for r in replies],
                                       "error-codes": codes, "errors": reasons, "records": names})))
    return Message(_record_dict(items), reply_to=message)

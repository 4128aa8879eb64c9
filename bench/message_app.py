"""The two Flower apps bench/bench_messages.py runs, copied (as ``benchapp.py``) into a scratch app folder beside
radfed's ``common/``, ``client/`` and ``server/`` (so the FAB holds radfed's exact code and its plan hash):

- ``timed``: radfed's own ServerApp, its Grid wrapped to record every batch of messages it pushes: the message type,
  the wall seconds, and per message the sizes of request and reply (array bytes, config/metric bytes).
  Written to ``<output-dir>/messages.json``.
- ``profiled_client``: radfed's ClientApp under cProfile in each simulation worker process, its statistics kept in
  ``<output-dir>/client-<pid>.prof`` (where the time of a site's messages goes inside the simulation);
  ``profiled_server``: ``timed`` under cProfile, kept in ``<output-dir>/server.prof`` (the coordinator's side).
- ``sized_client``: radfed's ClientApp noting, per message, the pickled size of the Context Flower ships with it
  and the handler's seconds (``<output-dir>/sizes-<pid>.jsonl``); ``noted_client``: the same notes without the
  Context's sizes (one appended line per message, as the floor with ``floor-timeline`` writes: where a batch's time
  goes, at the cost of that line on both sides), with the message's thread and process CPU, garbage collections and
  the site's parts (its data, the model split, the training step: wall and CPU) in the worker.
- ``floor_server`` + ``floor_client``: replay that record on the same number of nodes: the same batches of the
  same message types with same-sized records, answered at once by a ClientApp that does nothing else (Flower's
  own cost per message: the floor). Written to ``<output-dir>/floor.json``. With ``floor-state-bytes`` in the
  record, each floor node also keeps that many bytes of names in its ``context.state`` (as a site's agreed lists
  were kept): what a node's state alone costs per message.
"""

from __future__ import annotations

import cProfile
import gc
import json
import os
import pickle
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client.app import app as radfed_client
from common.batch import BATCH
from common.protocol import REPLIES
from server.app import main as radfed_main
from server.polling import polling

RECORD = "messages.json"
FLOOR = "floor.json"


def sizes(content: RecordDict) -> tuple[int, int]:
    """(array bytes, config and metric bytes as JSON) of a message's content."""
    arrays, other = 0, 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            arrays += sum(len(a.data) for a in record.values())
        else:
            other += len(json.dumps({k: v for k, v in record.items()}, default=repr))
    return arrays, other


class TimedGrid:
    """A Grid that records each batch of messages (type, seconds from push to the last reply, request and reply
    sizes) and otherwise does what the wrapped Grid does. radfed's coordinator waits through ``push_messages`` /
    ``pull_messages`` (server/polling.py), so a batch is what one push sent, done when its last reply is pulled."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.batches: list[dict[str, object]] = []
        self._open: list[dict[str, object]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        start = time.perf_counter()
        ids = list(self._grid.push_messages(messages))
        self._open.append({"start": start, "messages": messages, "pending": set(ids), "replies": {}, "end": start,
                           "wall": time.time(), "pulls": [], "pulling": 0.0})
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        t = time.perf_counter()
        replies = list(self._grid.pull_messages(message_ids))
        now = time.perf_counter()
        for batch in self._open:  # when each pull came and how long it took (the coordinator's own CPU)
            batch["pulls"].append(now - batch["start"])  # type: ignore[attr-defined]
            batch["pulling"] += now - t  # type: ignore[operator]
        for r in replies:
            for batch in self._open:
                if r.metadata.reply_to_message_id in batch["pending"]:  # type: ignore[operator]
                    batch["pending"].discard(r.metadata.reply_to_message_id)  # type: ignore[attr-defined]
                    batch["replies"][r.metadata.reply_to_message_id] = r  # type: ignore[index]
                    batch["end"] = now
        for batch in [b for b in self._open if not b["pending"]]:
            self._close(batch)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = set(self.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while ids and (timeout is None or time.time() < end):
            got = list(self.pull_messages(ids))
            replies.extend(got)
            ids.difference_update(r.metadata.reply_to_message_id for r in got)
            if ids:
                time.sleep(0.01)
        return replies

    def finish(self) -> None:
        """Record the batches still waiting for a reply (a site that left), up to their last reply."""
        for batch in list(self._open):
            self._close(batch)

    def _close(self, batch: dict) -> None:
        self._open.remove(batch)
        nodes = sorted(self._grid.get_node_ids())
        rows = []
        for m in batch["messages"]:
            reply = batch["replies"].get(m.metadata.message_id)
            answer = sizes(reply.content) if reply is not None and not reply.has_error() else (0, 0)
            rows.append({"node": nodes.index(m.metadata.dst_node_id) if m.metadata.dst_node_id in nodes else 0,
                         "request": sizes(m.content), "reply": answer})
        types = sorted({m.metadata.message_type for m in batch["messages"]})
        self.batches.append({"type": ",".join(types), "seconds": batch["end"] - batch["start"], "messages": rows,
                             "pushed": batch["wall"], "pulls": batch["pulls"], "pulling": batch["pulling"]})


timed = ServerApp()


@timed.main()
def timed_main(grid: Grid, context: Context) -> None:
    recorder = TimedGrid(grid)
    start = time.perf_counter()
    try:
        radfed_main(recorder, context)  # type: ignore[arg-type]
    finally:
        recorder.finish()
        out = Path(str(context.run_config["output-dir"])).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        (out / RECORD).write_text(json.dumps({"seconds": time.perf_counter() - start, "nodes": len(
            list(grid.get_node_ids())), "batches": recorder.batches}), encoding="utf-8")


profiled_server = ServerApp()


@profiled_server.main()
def profiled_server_main(grid: Grid, context: Context) -> None:
    """radfed's coordinator (timed as ``timed`` is) under cProfile: ``<output-dir>/server.prof``."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        timed_main(grid, context)
    finally:
        profiler.disable()
        profiler.dump_stats(str(Path(str(context.run_config["output-dir"])).expanduser() / "server.prof"))


_PROFILER: list[cProfile.Profile] = []  # one per worker process, made there (a Profile does not pickle)


class _ProfiledClientApp(ClientApp):
    """radfed's ClientApp, profiled; the statistics of this process so far are written after every message."""

    def __call__(self, message: Message, context: Context) -> Message:
        if not _PROFILER:
            _PROFILER.append(cProfile.Profile())
        _PROFILER[0].enable()
        try:
            return radfed_client(message, context)
        finally:
            _PROFILER[0].disable()
            out = Path(str(context.run_config["output-dir"])).expanduser()
            _PROFILER[0].dump_stats(str(out / f"client-{os.getpid()}.prof"))


profiled_client = _ProfiledClientApp()


class _SizedClientApp(ClientApp):
    """radfed's ClientApp, noting per message its type, the handler's seconds and the pickled size of the node's
    Context before and after (what Flower's simulation ships to the Ray actor and back with every message), one
    JSON line per message in ``<output-dir>/sizes-<pid>.jsonl``."""

    def __call__(self, message: Message, context: Context) -> Message:
        wall = time.time()
        before = len(pickle.dumps(context))
        t = time.perf_counter()
        try:
            return radfed_client(message, context)
        finally:
            seconds = time.perf_counter() - t
            line = {"type": message.metadata.message_type, "seconds": seconds, "context-in": before,
                    "context-out": len(pickle.dumps(context)), "state-keys": len(context.state),
                    "id": message.metadata.message_id, "in": wall, "out": wall + seconds}
            _note(context, line)


_SPLIT: dict[str, float] = {}  # this process's time in radfed's parts during the current message (seconds)


def _timed(module: object, name: str) -> None:
    """Wrap ``module.name`` (looked up at each call by its callers) to add its wall and thread-CPU seconds to _SPLIT."""
    inner = getattr(module, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            _SPLIT[name] = _SPLIT.get(name, 0.0) + time.perf_counter() - wall
            _SPLIT[f"{name}-cpu"] = _SPLIT.get(f"{name}-cpu", 0.0) + time.thread_time() - cpu

    setattr(module, name, wrapper)


def _split_parts() -> None:
    """Time, inside the worker, the site's data (client.app._data), the model split (_model_split) and the training
    step (client.compute.train_step): the rest of a message is Flower's records, the mods (stamps, guard, ledger,
    approval) and the reply."""
    import client.app as site_app
    from client import compute

    _timed(site_app, "_data")
    _timed(site_app, "_model_split")
    _timed(compute, "train_step")


_split_parts()
_GC_STARTED: list[float] = []


def _gc_timer(phase: str, info: dict[str, int]) -> None:
    """Add each garbage collection's seconds to _SPLIT (``gc-<generation>``)."""
    if phase == "start":
        _GC_STARTED[:] = [time.perf_counter()]
    elif _GC_STARTED:
        key = f"gc-{info['generation']}"
        _SPLIT[key] = _SPLIT.get(key, 0.0) + time.perf_counter() - _GC_STARTED[0]


gc.callbacks.append(_gc_timer)


class _NotedClientApp(ClientApp):
    """radfed's ClientApp noting, per message, its type and when it entered and left the handler (wall clock), as the
    floor does with ``floor-timeline``: one JSON line per message in ``<output-dir>/sizes-<pid>.jsonl``; with the
    thread's and the process's CPU seconds over the message (working vs waiting), the collections the garbage
    collector ran, the process's threads, and the parts _split_parts times."""

    def __call__(self, message: Message, context: Context) -> Message:
        _SPLIT.clear()
        gcs = sum(s["collections"] for s in gc.get_stats())
        wall, cpu, proc, t = time.time(), time.thread_time(), time.process_time(), time.perf_counter()
        try:
            return radfed_client(message, context)
        finally:
            seconds = time.perf_counter() - t
            _note(context, {"type": message.metadata.message_type, "id": message.metadata.message_id, "in": wall,
                            "out": wall + seconds, "cpu": time.thread_time() - cpu,
                            "process-cpu": time.process_time() - proc,
                            "gc": sum(s["collections"] for s in gc.get_stats()) - gcs,
                            "threads": threading.active_count(), "pid": os.getpid(), **_SPLIT})


noted_client = _NotedClientApp()


def _note(context: Context, line: dict) -> None:
    out = Path(str(context.run_config["output-dir"])).expanduser()
    with (out / f"sizes-{os.getpid()}.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")


sized_client = _SizedClientApp()


def _padded(array_bytes: int, other_bytes: int, extra: dict[str, int] | None = None) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({"pad": Array(np.zeros(max(array_bytes - 128, 1), dtype=np.uint8))}),
                       "config": ConfigRecord({"pad": "x" * max(other_bytes - 16, 0), **(extra or {})})})


floor_server = ServerApp()


@floor_server.main()
def floor_main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["output-dir"])).expanduser()
    record = json.loads((out / RECORD).read_text(encoding="utf-8"))
    while len(list(grid.get_node_ids())) < record["nodes"]:
        time.sleep(0.2)
    nodes = sorted(grid.get_node_ids())
    recorder = TimedGrid(grid)  # the pulls noted as radfed's are
    waiting = polling(recorder)  # type: ignore[arg-type]  # the coordinator's own way of waiting, so only the ClientApp differs
    timings = []
    start = time.perf_counter()
    state = int(record.get("floor-state-bytes", 0))
    timeline = bool(record.get("floor-timeline", False))
    for batch in record["batches"]:
        kind = batch["type"].split(",")[0]
        messages = [Message(_padded(*m["request"], {"reply-arrays": m["reply"][0], "reply-other": m["reply"][1],
                                                    "state-bytes": state, "timeline": timeline}),
                            dst_node_id=nodes[m["node"]], message_type=kind) for m in batch["messages"]]
        wall = time.time()
        replies = list(waiting.send_and_receive(messages, timeout=600))
        if any(r.has_error() for r in replies) or len(replies) != len(messages):
            raise RuntimeError(f"the floor's {kind} batch failed: {[r.error.reason for r in replies if r.has_error()]}")
        pulled = recorder.batches.pop()
        # timed from push to the last reply's pull, as radfed's batches are (TimedGrid)
        timings.append({"type": batch["type"], "seconds": pulled["seconds"], "n": len(messages), "pushed": wall,
                        "pulls": pulled["pulls"], "pulling": pulled["pulling"]})
    (out / FLOOR).write_text(json.dumps({"seconds": time.perf_counter() - start, "batches": timings}),
                             encoding="utf-8")


floor_client = ClientApp()


def _echo(msg: Message, context: Context) -> Message:
    config, wall = msg.content["config"], time.time()
    state = int(config.get("state-bytes", 0))  # type: ignore[arg-type]
    if state and "pad" not in context.state:  # names of ~40 characters, as a site's agreed feature list
        context.state["pad"] = ConfigRecord({"names": [f"original_glcm_feature_{i:018d}" for i in range(state // 40)]})
    content = _padded(int(config["reply-arrays"]), int(config["reply-other"]))  # type: ignore[arg-type]
    content["metrics"] = MetricRecord({"num-examples": 1})
    if config.get("timeline", False):
        _note(context, {"type": msg.metadata.message_type, "id": msg.metadata.message_id, "in": wall,
                        "out": time.time()})
    return Message(content, reply_to=msg)


floor_client.train()(_echo)
floor_client.evaluate()(_echo)
for _kind in [*REPLIES, BATCH]:  # query.batch: requests merged into one message (exact training's first round)
    if _kind.startswith("query."):
        floor_client.query(_kind.split(".", 1)[1])(_echo)

"""Running a run's folds (leave-one-site-out, local-only baselines, cross-validation) together, in the same rounds.

Each fold is still ``pipeline.fit`` (and scoring) on its own cohort, written as if it ran alone: one code path.
With ``fold-batching = true`` each fold runs in its own thread with a ``FoldGrid`` in place of the run's grid.
The folds take turns, in fold order, one at a time (so the audit log, the DP accounts and everything else a fold
touches see the same order every run): a fold runs until it sends its next query, then the next fold runs.
When every live fold waits (or has finished), the coordinator packs, per site, every pending request of every
fold into ONE ``query.batch`` message (``common.batch``), sends them once, and hands each fold its
replies. Folds converge at different rounds, so one batch may carry different message types.

Sites split a batch before their mod stack (``client.batch``): each sub-request passes the approval check, the
DP mods, the privacy guard, the release ledger and the outbox exactly as a message of its own does, and a
sub-request that fails is that fold's dropout only (the site's own words, as today).

``fold-batching = false`` runs the folds one after another on the run's grid, as before; both give identical
fold results (``tests/test_fold_batching.py``). Either way the run's ``folds-end`` audit entry counts the
Flower messages the folds sent.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any

from flwr.app import Error, Message, RecordDict
from flwr.serverapp import Grid

from common import batch
from server.federation import Run, RunRefused
from server.merging import Reply, Request

log = logging.getLogger("flwr.radfed.server")


@dataclass
class FoldJob:
    """One fold: its audit kind ("leave-one-site-out", "local-only", "cross-validation"), its tag, and the work
    (``pipeline.fit`` and scoring on the fold's cohort), given the run whose grid it must talk through."""

    kind: str
    fold: str
    work: Callable[[Run], Any]


class CountingGrid(Grid):
    """The run's grid, counting the messages sent through it (the sequential folds' count)."""

    def __init__(self, grid: Grid) -> None:
        self.inner, self.messages, self.requests = grid, 0, 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        # the run's grid packs several requests to one site into one message (merge-phases, server/merging.py)
        self.messages += len({m.metadata.dst_node_id for m in messages})
        self.requests += len(messages)
        return self.inner.send_and_receive(messages, timeout=timeout) if messages else []

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    # what Flower's Strategy and radfed never call on a fold's grid: refused, so a new caller is noticed
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("a fold's grid only sends through send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("a fold's grid only sends through send_and_receive")

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError("build a Message directly")

    def set_run(self, run_id: int) -> None:
        raise NotImplementedError("a fold's grid belongs to the run")

    @property
    def run(self) -> Any:
        return self.inner.run


@dataclass
class _Turn:
    """One fold thread's place in the turn-taking: it runs while ``go`` is set and parks (with its pending
    requests, or finished) by setting ``parked``."""

    index: int
    go: threading.Event = field(default_factory=threading.Event)
    parked: threading.Event = field(default_factory=threading.Event)
    pending: list[Message] = field(default_factory=list)
    replies: list[Message] = field(default_factory=list)
    finished: bool = False
    aborted: bool = False
    cpu: float = 0.0  # this fold thread's CPU seconds in its turns (time.thread_time)
    since: float = 0.0  # thread_time when its current turn began


class FoldGrid(CountingGrid):
    """What one fold thread sees as the grid: ``send_and_receive`` hands the requests to the coordinator and
    waits for this fold's share of the batched replies."""

    packs_every_request = True  # a cohort's queries build merging.Request, not Messages (federation.build)

    def __init__(self, grid: Grid, turn: _Turn) -> None:
        super().__init__(grid)
        self.turn = turn

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:  # e.g. FedAvg's evaluate step when rounds are not evaluated: nothing to wait for
            return []
        turn = self.turn
        for m in messages:  # an id of its own: FedAvg finds a reply's site by the request it answers
            if isinstance(m, Request):
                m.metadata.message_id = uuid.uuid4().hex
            else:  # a Flower Message (FedAvg's own): Flower's internal field, as its grids set it
                m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        turn.pending, turn.replies = messages, []
        turn.go.clear()
        turn.cpu += time.thread_time() - turn.since
        turn.parked.set()
        turn.go.wait()
        turn.since = time.thread_time()
        if turn.aborted:
            raise RunRefused("the run stopped while this fold waited for its replies")
        return turn.replies


class _GcClock:
    """Wall seconds in Python's garbage collector (every thread's), and how many full collections ran: a ``gc``
    callback, the collector's own start and stop."""

    def __init__(self) -> None:
        self.seconds, self.full, self._start = 0.0, 0, 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._start
        self.full += info.get("generation") == 2


def _run_turns(grid: Grid, timeout: float, turns: list[_Turn],
               sync: Callable[[], None]) -> tuple[int, int, int, dict[str, float], dict[str, float]]:
    """Drive the fold threads until every one has finished; returns (messages, sub-requests, rounds) sent, the
    wall seconds by step: the folds' own work between rounds (pooling, audit, building requests), packing, the
    round trips (the sites and Flower's delivery), unpacking; and the CPU seconds: the fold threads' in their turns,
    this thread's packing and unpacking, and the whole process's over the folds (Flower's simulation threads and
    any other thread of the ServerApp's process too). ``sync`` puts the folds' audit entries on disk (they write them
    deferred): once per round, after every fold's turn and before anything leaves."""
    messages = requests = rounds = 0
    spent = dict.fromkeys(("folds", "pack", "sites", "unpack"), 0.0)
    cpu = dict.fromkeys(("pack", "unpack"), 0.0)
    process = time.process_time()
    collecting = _GcClock()
    gc.callbacks.append(collecting)
    live = list(turns)
    while live:
        t0 = time.perf_counter()
        for turn in live:  # one at a time, in fold order: each runs until it sends or ends
            turn.parked.clear()
            turn.go.set()
            turn.parked.wait()
        sync()  # the round's entries on disk (one fsync for all) before its requests leave or the folds end
        t1 = time.perf_counter()
        spent["folds"] += t1 - t0
        live = [t for t in live if not t.finished]
        waiting = [t for t in live if t.pending]
        if not waiting:
            continue
        c1 = time.thread_time()
        batches = batch.pack([m for t in waiting for m in t.pending])  # in fold order
        rounds, messages = rounds + 1, messages + len(batches)
        requests += sum(len(t.pending) for t in waiting)
        t2, c2 = time.perf_counter(), time.thread_time()
        replies = list(grid.send_and_receive([b.message for b in batches], timeout=timeout))
        t3, c3 = time.perf_counter(), time.thread_time()
        by_request = _unpack(batches, replies)
        for t in waiting:
            t.replies = [by_request[m.metadata.message_id] for m in t.pending if m.metadata.message_id in by_request]
            t.pending = []
        spent["pack"] += t2 - t1
        spent["sites"] += t3 - t2
        spent["unpack"] += time.perf_counter() - t3
        cpu["pack"] += c2 - c1
        cpu["unpack"] += time.thread_time() - c3
    gc.callbacks.remove(collecting)
    cpu = {"folds": sum(t.cpu for t in turns), **cpu, "process": time.process_time() - process,
           "gc": collecting.seconds, "gc-full": collecting.full}
    return messages, requests, rounds, {k: round(v, 3) for k, v in spent.items()}, \
        {k: round(v, 3) for k, v in cpu.items()}


def _reply(request: Message | Request, reply: Message, content: RecordDict | None,
           error: Error | None) -> Message | Reply:
    """A ``merging.Reply`` for a cohort's ``Request`` (its records or its error), Flower's sub-reply ``Message`` for a
    ``Message`` (FedAvg's)."""
    if isinstance(request, Request):
        return Reply(request, content, error)
    return batch.sub_reply(request, reply, content, error)


def _unpack(batches: list[batch.Batch], replies: list[Message]) -> dict[str, Message | Reply]:
    """Each sub-request's reply by its id (``common.batch.unpack_replies``), built by ``_reply``."""
    return batch.unpack_replies(batches, replies, _reply)


def run_folds(run: Run, jobs: list[FoldJob]) -> dict[str, Any]:
    """Every job's result by fold tag: together in the same rounds (``fold-batching``) or one after another."""
    if not jobs:
        return {}
    kinds = sorted({j.kind for j in jobs})
    if not run.config.fold_batching:
        counting = CountingGrid(run.grid)
        alone = replace(run, grid=counting)
        out = {}
        for index, job in enumerate(jobs, start=1):
            run.audit.append("fold-start", kind=job.kind, fold=job.fold, index=index, of=len(jobs))
            with run.audit.fold_context(job.fold):
                out[job.fold] = job.work(alone)
        run.audit.append("folds-end", kinds=kinds, folds=len(jobs), batched=False, messages=counting.messages,
                         requests=counting.requests)
        return out
    run.audit.append("fold-start", kind=" + ".join(kinds), fold=f"{len(jobs)} folds together", index=None,
                     of=len(jobs), together=[j.fold for j in jobs])
    log.info("Running %d fold(s) together (%s): one message per site per round", len(jobs), ", ".join(kinds))
    turns = [_Turn(i) for i in range(len(jobs))]
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def body(job: FoldJob, turn: _Turn) -> None:
        turn.go.wait()
        turn.since = time.thread_time()
        try:
            # the fold's entries written in turn order, put on disk by the coordinator's sync before each round
            # leaves (one fsync per round, not one per entry: the turns run one at a time, so theirs never overlap)
            with run.audit.fold_context(job.fold), run.audit.deferred():
                results[job.fold] = job.work(replace(run, grid=FoldGrid(run.grid, turn)))
        except BaseException as exc:  # noqa: BLE001  # handed to the coordinator, raised there
            errors.append(exc)
        finally:
            turn.cpu += time.thread_time() - turn.since
            turn.finished = True
            turn.parked.set()

    threads = [threading.Thread(target=body, args=(job, turn), name=f"fold-{job.fold}", daemon=True)
               for job, turn in zip(jobs, turns, strict=True)]
    for t in threads:
        t.start()
    # every object alive now (the coordinator's modules, Flower, Ray, torch, matplotlib, the main fit) leaves the
    # collector's sight until the folds end: a full collection walked all of them (~350,000: 0.85 s at load 15), some
    # of them during the folds' turns, holding the GIL; only the folds' own objects are collected meanwhile
    gc.freeze()
    try:
        messages, requests, rounds, spent, cpu = _run_turns(run.grid, run.timeout, turns, run.audit.sync)
    except BaseException:  # e.g. the coordinator was stopped: every waiting fold ends, nothing more is sent
        for turn in turns:
            turn.aborted = True
            turn.go.set()
        with suppress(OSError):
            run.audit.sync()  # what the folds logged so far, on disk as the stop is logged
        raise
    finally:
        gc.unfreeze()
    for t in threads:
        t.join()
    run.audit.sync()  # every fold's last entries (a fold's failure included) on disk before the run goes on
    if errors:
        raise errors[0]
    run.audit.append("folds-end", kinds=kinds, folds=len(jobs), batched=True, messages=messages,
                     requests=requests, rounds=rounds, seconds={**spent, "cpu": cpu})
    log.info("The %d fold(s) took %d round(s) of %d message(s) in all, carrying %d request(s)", len(jobs), rounds,
             messages, requests)
    return {job.fold: results[job.fold] for job in jobs if job.fold in results}

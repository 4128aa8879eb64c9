"""One site's ClientApp driven in this process with real Flower messages (all mods included), for profiling
and for tests that compare replies: the features query, then FedAvg ``train`` messages on a fixed model."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client import nodestate, runcache
from client.app import app
from client.guard import SITE_STATE
from common import model
from common.canon import sha256_json
from radfed.cli.coordinator import approve_demo_plan
from radfed.launch import app_run_config


class SiteHarness:
    """A node serving ``site_dir`` in one run (run id ``run_id``) of the app with ``config`` overrides."""

    def __init__(self, site_dir: Path, config: dict, run_id: int = 1, n_features: int = 8) -> None:
        approve_demo_plan([site_dir], config)
        self.context = Context(run_id=run_id, node_id=42, node_config={"site-dir": str(site_dir)},
                               state=RecordDict(), run_config=app_run_config(config))
        self.round = 0
        reply = self.send("query.features", RecordDict({"config": ConfigRecord({})}))
        names = [str(n) for n in reply.content["config"]["features"]]  # type: ignore[union-attr]
        self.context.state[SITE_STATE] = ConfigRecord({"features": names})
        self.selected = names[:n_features]
        net = model.build_model(np.zeros(len(self.selected)), np.ones(len(self.selected)))
        self.arrays = ArrayRecord(net.state_dict())

    def send(self, message_type: str, content: RecordDict) -> Message:
        meta = {"run_id": self.context.run_id, "message_id": uuid.uuid4().hex, "src_node_id": 1,
                "dst_node_id": 42, "reply_to_message_id": "", "group_id": "1", "created_at": 0.0, "ttl": 3600.0,
                "message_type": message_type}
        reply = app(Message(content, metadata=Metadata(**meta)), self.context)
        if reply.has_error():
            raise RuntimeError(f"{message_type} refused: {reply.error.reason}")
        return reply

    def train(self) -> Message:
        """One FedAvg round's train message on the same global model (its reply is a pure function of it)."""
        self.round += 1
        config = ConfigRecord({"pos-weight": 1.0, "features": self.selected,
                               "features-sha256": sha256_json(self.selected), "server-round": self.round,
                               "local-epochs": 2, "learning-rate": 0.05, "weight-decay": 0.001})
        return self.send("train", RecordDict({"arrays": self.arrays, "config": config}))

    @staticmethod
    def forget() -> None:
        """Drop everything the node's process keeps between messages: the next message reloads the site."""
        runcache.clear()
        nodestate.clear()


class BatchHarness(SiteHarness):
    """The same site in a leave-one-site-out run over ``n_sites`` sites with exact training: it trains in every
    fold but its own, so each round brings one ``query.batch`` of ``n_sites - 1`` Newton requests (one per fold,
    each fold with its own harmonisation and model features), as the coordinator packs them (common.batch)."""

    def __init__(self, site_dir: Path, config: dict, n_sites: int, n_features: int = 3) -> None:
        super().__init__(site_dir, {**config, "training": "exact", "external-validation": "loso"},
                         n_features=n_features)
        self.folds = [f"site-{i:03d}" for i in range(1, n_sites)]  # every other site's fold
        d = len(self.context.state[SITE_STATE]["features"])  # type: ignore[arg-type]
        names = [str(n) for n in self.context.state[SITE_STATE]["features"]]  # type: ignore[union-attr]
        for fold in self.folds:  # each fold joins its own ComBat (setup, not timed): identity pooled estimates
            arrays = ArrayRecord({"grand-mean": Array(np.zeros(d)), "var-pooled": Array(np.ones(d)),
                                  "beta-cov": Array(np.zeros((0, d))), "zero-variance": Array(np.zeros(d))})
            self.send("query.combat_join", RecordDict({"arrays": arrays, "config": ConfigRecord(
                {"features": names, "features-sha256": sha256_json(names), "fold": fold, "n-sites": n_sites,
                 "n-pooled": 40 * n_sites})}))
        s = len(self.selected)
        self.coef = ArrayRecord({"coef": Array(np.zeros(s + 1)), "mean": Array(np.zeros(s)),
                                 "scale": Array(np.ones(s))})

    def batch(self) -> Message:
        """One round: every fold's Newton request in one ``query.batch``; raises if any sub-request is refused."""
        from common import batch

        self.round += 1
        requests = []
        for fold in self.folds:
            config = ConfigRecord({"pos-weight": 1.0, "features": self.selected, "server-round": self.round,
                                   "features-sha256": sha256_json(self.selected), "fold": fold})
            meta = Metadata(run_id=self.context.run_id, message_id=uuid.uuid4().hex, src_node_id=1, dst_node_id=42,
                            reply_to_message_id="", group_id="1", created_at=0.0, ttl=3600.0,
                            message_type="query.newton")
            requests.append(Message(RecordDict({"arrays": self.coef, "config": config}), metadata=meta))
        [packed] = batch.pack(requests)
        reply = self.send(batch.BATCH, packed.message.content)
        failed = [str(e) for e in reply.content[batch.INDEX]["errors"] if e]  # type: ignore[union-attr]
        if failed:
            raise RuntimeError(f"{len(failed)} sub-request(s) refused: {failed[0]}")
        return reply


def profile_batches(site_dir: Path, config: dict, n_sites: int, n_batches: int = 5, top: int = 12) -> tuple[float, str]:
    """cProfile of one site answering ``n_batches`` leave-one-site-out batches of ``n_sites - 1`` Newton requests:
    (ms per sub-request without the profiler, the top functions by own time with it)."""
    import cProfile
    import io
    import pstats
    import statistics
    import time

    harness = BatchHarness(site_dir, config, n_sites)
    harness.batch()  # the first batch of a run loads the site either way
    seconds = []
    for _ in range(n_batches):
        t = time.perf_counter()
        harness.batch()
        seconds.append(time.perf_counter() - t)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(n_batches):
        harness.batch()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    lines = [line for line in out.getvalue().splitlines() if "ncalls" in line or ("/" in line and "List" not in line)
             or "{" in line]
    return 1000 * statistics.median(seconds) / (n_sites - 1), "\n".join(lines)


def replay(capture: Path, work: Path, passes: int = 3, profile_top: int = 0, site: Path | None = None) -> dict:
    """A site's captured messages (bench/loso_site_app.py ``RADFED_CAPTURE_NODE``) answered again in this process,
    on a copy of the site (``site``, else the one the capture's node served) under ``work``: once in order (its
    replies' digests, to compare two versions), then
    ``passes`` more times each from its context as captured, timing the process CPU of every ``query.batch`` by the
    kind of its sub-requests. Returns {"digests": [...], "cpu_ms": {kind: [ms per sub-request, one per pass]},
    "subs": {kind: sub-requests per pass}, "lines": the outbox's and releases.jsonl's lines of the first
    answers (times left out), "top": cProfile text of one more pass (``profile_top`` lines)}."""
    import cProfile
    import hashlib
    import io
    import json
    import pickle
    import pstats
    import shutil
    import time

    from flwr.supercore.task_identity import TaskIdentity

    from client.app import app as site_app
    from client.steps import locate_site, run_config
    from common import batch

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # Flower's Message needs them
    blobs = [p.read_bytes() for p in sorted(capture.glob("*.pkl"))]
    first_msg, first_ctx = pickle.loads(blobs[0])
    site = (site or locate_site(first_ctx.node_config, run_config(first_ctx.run_config))).resolve()
    root = work / "root"
    shutil.rmtree(work, ignore_errors=True)
    root.mkdir(parents=True)
    shutil.copytree(site, root / site.name, symlinks=True)
    local = {"data-root": str(root), "output-dir": str(work / "out")}
    approve_demo_plan([root / site.name], {**first_ctx.run_config, **local})

    def loaded(blob: bytes) -> tuple[Message, Context]:
        msg, ctx = pickle.loads(blob)
        ctx.run_config = {**ctx.run_config, **local}
        ctx.node_config = {"site-dir": str(root / site.name)}  # the copy, whichever partition the node served
        return msg, ctx

    def digest(reply: Message) -> str:
        if reply.has_error():
            return f"error {reply.error.code}: {reply.error.reason}"
        h = hashlib.sha256()
        for name, record in sorted(reply.content.items()):
            h.update(name.encode())
            for key, value in sorted(record.items()):
                h.update(key.encode() + (value.data if isinstance(value, Array) else repr(value).encode()))
        return h.hexdigest()

    def kind(msg: Message) -> str:
        if msg.metadata.message_type != batch.BATCH:
            return msg.metadata.message_type
        types = sorted({str(t) for t in msg.content[batch.INDEX]["types"]})  # type: ignore[union-attr]
        return f"batch of {'+'.join(types)}"

    logs = ("outbox.jsonl", "releases.jsonl", "ledger.json")
    before = {name: len(path.read_text(encoding="utf-8").splitlines()) for name in logs
              for path in root.rglob(name)}
    digests = [digest(site_app(*loaded(b))) for b in blobs]
    lines = {}  # what the site logged answering them once: its new outbox and releases lines, times left out
    for name in logs:
        for path in root.rglob(name):
            text = path.read_text(encoding="utf-8")
            if name == "ledger.json":  # its sets and frozen blocks (their times left out)
                doc = json.loads(text)
                lines[name] = sorted(doc["sets"]) + sorted(doc["blocks"])
                continue
            lines[name] = [json.dumps({k: v for k, v in json.loads(line).items() if k != "time"}, sort_keys=True)
                           for line in text.splitlines()[before.get(name, 0):]]
    cpu: dict[str, list[float]] = {}
    subs: dict[str, int] = {}
    batches = [b for b in blobs if loaded(b)[0].metadata.message_type == batch.BATCH]
    for p in range(passes):
        spent: dict[str, float] = {}
        for blob in batches:
            msg, ctx = loaded(blob)
            t = time.process_time()
            site_app(msg, ctx)
            spent[kind(msg)] = spent.get(kind(msg), 0.0) + time.process_time() - t
            if p == 0:
                subs[kind(msg)] = subs.get(kind(msg), 0) + len(msg.content[batch.INDEX]["ids"])  # type: ignore[union-attr, arg-type]
        for k, s in spent.items():
            cpu.setdefault(k, []).append(1000 * s / subs[k])
    top = ""
    if profile_top:
        profiler = cProfile.Profile()
        for blob in batches:
            msg, ctx = loaded(blob)
            profiler.enable()
            site_app(msg, ctx)
            profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(profile_top)
        top = out.getvalue()
    return {"digests": digests, "lines": lines, "cpu_ms": cpu, "subs": subs, "top": top}

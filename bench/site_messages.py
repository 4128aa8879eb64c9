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

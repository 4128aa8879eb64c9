"""One site's ClientApp driven in this process with real Flower messages (all mods included), for profiling
and for tests that compare replies: the features query, then FedAvg ``train`` messages on a fixed model."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client import runcache
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

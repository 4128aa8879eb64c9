"""One site's ClientApp driven in process, as a node of a run: shared by the site-state tests."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client import runcache, steps
from client.app import app
from common import protocol
from common.canon import sha256_json
from radfed import synth
from radfed.cli import approve_demo_plan
from radfed.launch import app_run_config


def request(message_type: str, content: RecordDict, message_id: str) -> Message:
    """A message from the coordinator (node 0) to node 7 of run 1."""
    meta = Metadata(run_id=1, message_id=message_id, src_node_id=0, dst_node_id=7, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content, metadata=meta)


def agreed_node(root: Path) -> tuple[Context, list[str]]:
    """A tiny approved site (12 cases per class) whose node answered the plan and agreed its features."""
    site = synth.write_site(root / "sites", synth.tiny_sites(1, 12)[0], seed=5)
    config = app_run_config({"data-root": str(site.parent), "harmonization": "combat", "min-cases-per-class": 5})
    approve_demo_plan([site], config)
    ctx = Context(run_id=1, node_id=7, node_config={"site-dir": str(site)}, state=RecordDict(), run_config=config)
    app(request(protocol.PLAN, RecordDict({"config": ConfigRecord({})}), "plan"), ctx)
    reply = app(request(protocol.FEATURES, RecordDict({"config": ConfigRecord({})}), "f"), ctx)
    return ctx, [str(n) for n in reply.content["config"]["features"]]


def combat_join(ctx: Context, names: list[str], fold: str, grand_mean: np.ndarray,
                var_pooled: np.ndarray) -> Message:
    """A cohort's ComBat join: the node agrees the fold's feature list ``names`` and keeps its parameters."""
    d = len(names)
    arrays = ArrayRecord({"grand-mean": Array(grand_mean), "var-pooled": Array(var_pooled),
                          "beta-cov": Array(np.zeros((0, d))), "zero-variance": Array(np.zeros(d))})
    config = {"features": names, "features-sha256": sha256_json(names), "fold": fold, "n-sites": 2, "n-pooled": 40}
    return app(request(protocol.COMBAT_JOIN, RecordDict({"config": ConfigRecord(config), "arrays": arrays}),
                       f"join-{fold}-{time.time_ns()}"), ctx)


def extracted_site(root: Path, seed: int, config: dict) -> Path:
    """One tiny site (12 cases per class) with its features extracted once."""
    site = synth.write_site(root, synth.tiny_sites(1, 12)[0], seed=seed)
    steps.load_site_data(site, config)
    return site


def settled_copy(extracted: Path, tmp_path: Path) -> Path:
    """A copy of ``extracted`` whose files are older than the run cache's settling time, the cache emptied."""
    copy = tmp_path / extracted.name
    shutil.copytree(extracted, copy)
    time.sleep(2 * runcache.SETTLE_FINE_NS / 1e9)  # files older than the settling time: the run cache keeps its entries
    runcache.clear()
    return copy

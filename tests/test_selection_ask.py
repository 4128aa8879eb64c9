"""The selection's correlation query asks the sites for the top candidates first (server.phases._decorrelated): the
same features as the walk over every candidate, in one smaller query, or a second one for all when the walk runs out."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from common import moments, protocol, selection
from common.runconfig import parse
from radfed.launch import app_run_config
from server.audit import AuditLog, load_or_create_key
from server.federation import Cohort, FeatureAgreement, Federation, Run
from server.phases import PooledMoments, selection_phase

pytestmark = pytest.mark.usefixtures("server_identity")  # tests/conftest.py


class SumsGrid:
    """Sites answering ``query.correlation`` with their real cross-products (client.compute's function), over the
    candidates each request names; records every request's candidate list."""

    def __init__(self, sites: dict[int, np.ndarray], names: list[str]) -> None:
        self.sites, self.index, self.asked = sites, {n: i for i, n in enumerate(names)}, []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grid stamps a message it pushes
            assert m.metadata.message_type == protocol.CORRELATION
            names = [str(n) for n in m.content["config"]["candidates"]]
            self.asked.append(len(names))
            x = self.sites[m.metadata.dst_node_id][:, [self.index[n] for n in names]]
            cross = selection.site_crossproducts(x, m.content["arrays"]["mean"].numpy(),
                                                 m.content["arrays"]["std"].numpy())
            reply = Message(RecordDict({"arrays": ArrayRecord({"crossproducts": Array(cross)}),
                                        "metrics": MetricRecord({"n": len(x)})}), reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            replies.append(reply)
        return replies


def _select(tmp_path, x_by_site, y_by_site, n_keep):
    d = x_by_site[0].shape[1]
    names = [f"f{i:03d}" for i in range(d)]
    sites = dict(enumerate(x_by_site, start=1))
    grid = SumsGrid(sites, names)
    config = parse({**app_run_config({}), "select-features": n_keep, "select-candidates": d})
    run = Run(grid, config, AuditLog(tmp_path / "audit.jsonl", load_or_create_key(tmp_path / "key")),  # type: ignore[arg-type]
              tmp_path, None)  # type: ignore[arg-type]
    overall = [moments.site_moments(x) for x in x_by_site]
    mean, std = moments.pooled_mean_std(*zip(*overall, strict=True))
    classwise = selection.pool_classwise([{c: moments.site_moments(x[y == c]) for c in (0, 1)}
                                          for x, y in zip(x_by_site, y_by_site, strict=True)])
    pooled = PooledMoments(sum(len(x) for x in x_by_site), mean, std, classwise)
    fed = Federation({nid: f"site-{nid}" for nid in sites}, 1)
    chosen = selection_phase(run, Cohort(fed, FeatureAgreement(names, "", 1.0, {})), pooled)
    # the reference: the same walk over every candidate, from the pooled data's own correlation
    x_all = np.vstack(x_by_site)
    t = selection.welch_t(classwise[1], classwise[0])
    order = [int(i) for i in np.argsort(-np.abs(t), kind="stable")]
    kept = selection.greedy_decorrelate(range(d), np.corrcoef(x_all[:, order], rowvar=False), 0.9, n_keep)
    return chosen, [names[order[i]] for i in kept], grid.asked


def _data(seed, d, copies):
    """Four sites; the ``copies`` best-ranked features are near-copies of one another."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for n in (30, 40, 25, 35):
        y = np.arange(n) % 2
        x = rng.normal(0, 1, (n, d)) + y[:, None] * np.linspace(3, 0.5, d)
        x[:, 1:copies] = x[:, [0]] + rng.normal(0, 0.01, (n, copies - 1))
        xs.append(x)
        ys.append(y)
    return xs, ys


def test_a_walk_that_finds_its_features_among_the_first_asks_only_those(tmp_path):
    xs, ys = _data(0, 60, 3)
    chosen, reference, asked = _select(tmp_path, xs, ys, 3)
    assert chosen.names == reference
    assert asked == [selection.first_ask(60, 3)] * 4 and selection.first_ask(60, 3) < 60  # one query, 28 of 60


def test_a_walk_that_runs_out_asks_again_for_every_candidate(tmp_path):
    xs, ys = _data(1, 60, 30)  # the top 30 are copies of one feature: the first 28 hold 1 feature to keep, not 3
    chosen, reference, asked = _select(tmp_path, xs, ys, 3)
    assert chosen.names == reference
    assert asked == [selection.first_ask(60, 3)] * 4 + [60] * 4

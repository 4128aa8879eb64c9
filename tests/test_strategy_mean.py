"""The coordinator's FedAvg round: the same model bits and hashes as Flower's own FedAvg, each update decoded once."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from common.canon import arrays_sha256
from server.audit import AuditLog
from server.federation import Federation
from server.strategy import AuditedFedAvg, record_sha256, weighted_mean


def _reply(node: int, arrays: dict[str, np.ndarray], n: int, loss: float) -> Message:
    """A site's train reply as the grid hands it to the strategy."""
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": loss})})
    meta = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"m{node}",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    return Message(content, metadata=meta)


def _updates(rng: np.random.Generator, sites: int) -> list[dict[str, np.ndarray]]:
    # awkward magnitudes and a 0-d array: any change in the order of operations shows in the last bits
    return [{"weight": rng.normal(size=(1, 9)) * 10.0 ** rng.integers(-8, 8, size=(1, 9)),
             "bias": rng.normal(size=(1,)), "scale": np.asarray(rng.normal())} for _ in range(sites)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_mean_is_flowers_mean_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    updates = _updates(rng, 7)
    weights = [int(n) for n in rng.integers(3, 400, size=7)]
    replies = [_reply(i + 1, u, n, 0.5) for i, (u, n) in enumerate(zip(updates, weights, strict=True))]
    flower = FedAvg().aggregate_train(1, replies)[0]
    ours = weighted_mean(updates, weights)
    assert flower is not None and set(ours) == set(flower.keys())
    for key, value in ours.items():
        assert np.asarray(value).tobytes() == flower[key].numpy().tobytes(), key


def test_a_round_gives_flowers_model_and_the_hashes_of_its_records(tmp_path):
    rng = np.random.default_rng(5)
    names = {1: "hospital-a", 2: "hospital-b", 3: "hospital-c", 4: "hospital-d"}
    updates = _updates(rng, 4)
    replies = [_reply(node, u, int(rng.integers(10, 60)), float(rng.random()))
               for node, u in zip(names, updates, strict=True)]
    audit = AuditLog(tmp_path / "audit.jsonl", Ed25519PrivateKey.generate())
    strategy = AuditedFedAvg(Federation(dict(names), min_sites=2), audit)
    arrays, metrics = strategy.aggregate_train(1, list(reversed(replies)))  # arrival order must not matter
    flower_arrays, flower_metrics = FedAvg().aggregate_train(1, replies)  # site-name order, as ours sorts them
    assert arrays is not None and flower_arrays is not None
    assert {k: a.data for k, a in arrays.items()} == {k: a.data for k, a in flower_arrays.items()}  # same bytes
    assert dict(metrics) == dict(flower_metrics)
    data = json.loads(audit.path.read_text().splitlines()[-1])["data"]
    assert data["aggregated_sha256"] == record_sha256(flower_arrays)
    for node, update in zip(names, updates, strict=True):
        site = data["sites"][names[node]]
        assert site["update_sha256"] == arrays_sha256(dict(zip(update, [Array(v).numpy() for v in update.values()],
                                                                strict=True)))

"""The guard's per-reply bookkeeping, worked out more cheaply (every sub-reply of a leave-one-site-out batch passes
it), writes and checks exactly what it did: the outbox line is the strict JSON of the same description, and the
agreed sizes are the lengths of the same lists (client.guard)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from site_helpers import agreed_node, combat_join

from client import guard, nodestate
from client.site import site_settings
from common.canon import json_safe
from common.npy import encode
from radfed import synth


def _reference(content: RecordDict, values: bool) -> dict:
    """The outbox's description as the guard wrote it before: described as sent, then made strict JSON whole."""
    out: dict = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            out[name] = {key: {"shape": list(arr.shape), "bytes": len(arr.data),
                               "sha256": hashlib.sha256(arr.data).hexdigest(),
                               **({"values": arr.numpy().tolist()} if values else {})} for key, arr in record.items()}
        else:
            out[name] = {key: (f"<{len(value)} items>" if isinstance(value, list) and len(value) > 8 else value)
                         for key, value in record.items()}
    return out


def _reply() -> RecordDict:
    grad = np.array([0.5, np.nan, -np.inf, 1e-300])
    return RecordDict({"arrays": ArrayRecord({"grad": encode(grad), "hess": encode(np.eye(4)[None].repeat(2, 0))}),
                       "metrics": MetricRecord({"n": 12, "loss": float("nan"), "big": float("inf"), "w": [1.0, 2.5]}),
                       "config": ConfigRecord({"names": [f"f{i}" for i in range(12)], "few": ["a", "b"],
                                               "flag": True})})


@pytest.mark.parametrize("values", [False, True])
def test_outbox_line_is_the_strict_json_of_the_same_description(tmp_path: Path, values: bool) -> None:
    site = synth.write_site(tmp_path / "sites", synth.tiny_sites(1, 6)[0], seed=5)
    if values:
        yaml = site / "site.yaml"
        yaml.write_text((yaml.read_text() if yaml.exists() else "") + "\noutbox_values: true\n", encoding="utf-8")
    settings = site_settings(site)
    assert bool(settings.get("outbox_values")) is values
    content = _reply()
    before = datetime.now(UTC)
    guard.record_outgoing(site, 7, "query.newton", content, "site-003")
    line = (Path(settings["output_dir"]) / "outbox.jsonl").read_text(encoding="utf-8").splitlines()[-1]
    entry = json.loads(line)
    assert datetime.fromisoformat(entry["time"]) >= before.replace(microsecond=before.microsecond // 1000 * 1000)
    expected = {"time": entry["time"], "run_id": 7, "type": "query.newton", "records": _reference(content, values),
                "fold": "site-003"}
    assert line == json.dumps(json_safe(expected), sort_keys=True)  # the same bytes as before, byte for byte
    assert entry["records"]["metrics"]["loss"] is None and entry["records"]["config"]["names"] == "<12 items>"
    if values:
        assert entry["records"]["arrays"]["grad"]["values"] == [0.5, None, None, 1e-300]


def test_agreed_sizes_are_the_lengths_of_each_cohorts_lists(tmp_path: Path) -> None:
    ctx, names = agreed_node(tmp_path)
    for fold, d in (("a", len(names)), ("b", 5), ("c", len(names))):
        assert not combat_join(ctx, names[:d], fold, np.zeros(d), np.ones(d)).has_error()
    record = ctx.state[guard.site_state_key("b")]
    record["selected"] = names[:3]  # a list kept as it is (not by hash) counts as well
    node = nodestate.of(ctx)
    for fold in ("", "a", "b", "c", "nobody"):
        sizes = guard.agreed_sizes(ctx, fold)
        site = ctx.state.get(guard.site_state_key(fold))
        lists = {key: guard.agreed_names(node, site, key) for key in ("features", "candidates", "selected")} \
            if site is not None else {}
        assert sizes.get("d") == (len(lists["features"]) if lists.get("features") is not None else None)
        assert sizes.get("s") == (len(lists["selected"]) if lists.get("selected") is not None else None)
        assert {k: sizes[k] for k in "pgtufov"} == guard._run_sizes(guard.run_config(ctx.run_config))
    assert guard.agreed_sizes(ctx, "b")["d"] == 5 and guard.agreed_sizes(ctx, "b")["s"] == 3
    sizes = guard.agreed_sizes(ctx, "a")
    sizes["d"] = -1  # a caller's change never reaches the next reply's check
    assert guard.agreed_sizes(ctx, "a")["d"] == len(names)

"""Gradient-boosted trees through real sites: one Flower simulation federation training them end to end, and a red
team: a coordinator grows trees on one site through its real ClientApp (real messages, the real privacy guard and
release ledger, real pyradiomics features) and then attacks what left.

The attacker is given the worst case: the exact case set behind every histogram cell it received. It tries to write
a single patient's indicator as a combination of those sets (least squares, per reply), which recovers that
patient's gradient, hence its diagnosis, whenever one lies in their span: the differencing attack of cumulative
per-case histograms (cell (e1, e2] = cumulative at e2 minus at e1) in its strongest form.

Block routing (client/trees.py) leaves it nothing. The naive design, each patient routed by its own value with
cumulative "left of each edge" sums and every cell below k suppressed, is replayed through the same handler and
guard by swapping the site function: declared honestly, the ledger refuses it; declaring only the training set
(what a per-reply k check alone would accept), it passes the guard and the attack recovers patients.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from federation_helpers import events, run_federation_in
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

import client.trees as site_trees
from client.ledger import Ledger
from client.steps import load_site_data, site_matrix
from common import trees
from common.canon import sha256_json
from common.release import isolated_group
from radfed import synth
from radfed.cli import approve_demo_plan
from radfed.launch import app_run_config

K = 5
CONFIG = {"harmonization": "none", "models": "gbt", "tree-rounds": 3, "tree-depth": 2, "tree-bins": 24,
          "tree-min-child-cases": 10, "min-cases-per-class": K}


@pytest.fixture(scope="module")
def site_source(tmp_path_factory) -> Path:
    """A site of 16 cases per class (3 blocks of 5 or 6 per class, 2 of each class train), its features extracted
    once (copies keep the cache; nothing is released here, so no ledger entry)."""
    site = synth.write_site(tmp_path_factory.mktemp("trees-site"), synth.tiny_sites(1, 16)[0], seed=23)
    load_site_data(site, app_run_config({"data-root": str(site.parent), **CONFIG}))
    return site


@pytest.fixture
def site(site_source, tmp_path) -> Path:
    target = tmp_path / "sites" / site_source.name
    shutil.copytree(site_source, target)  # a fresh ledger per test, the feature cache kept
    return target


@pytest.fixture
def two_sites(site_source, tmp_path) -> Path:
    """Two hospitals for a federation: copies of the site under two names (each its own ledger and outbox; the
    feature cache, keyed by the images' hashes, is reused, so nothing is extracted again)."""
    root = tmp_path / "federation"
    for name in ("tiny-a", "tiny-b"):
        shutil.copytree(site_source, root / name)
    return root


def _send(context: Context, message_type: str, content: RecordDict) -> Message:
    from client.app import app

    meta = Metadata(run_id=context.run_id, message_id=f"{message_type}-{time.monotonic_ns()}", src_node_id=0,
                    dst_node_id=context.node_id, reply_to_message_id="", group_id="1", created_at=time.time(),
                    ttl=3600.0, message_type=message_type)
    return app(Message(content, metadata=meta), context)


def _coordinator_grows(site: Path, known: list[dict[str, frozenset[str]]]):
    """Plan, features, then tree levels until done or refused. Returns (grower, replies' arrays, refusal, truth)."""
    config = app_run_config({"data-root": str(site.parent), **CONFIG})
    approve_demo_plan([site], config)
    context = Context(run_id=501, node_id=7, node_config={"site-dir": str(site)}, state=RecordDict(),
                      run_config=config)
    assert not _send(context, "query.plan", RecordDict({"config": ConfigRecord({})})).has_error()
    names = [str(n) for n in _send(context, "query.features", RecordDict({"config": ConfigRecord({})}))
             .content["config"]["features"]]
    agreed = {"features": names, "features-sha256": sha256_json(names)}
    assert not _send(context, "query.moments", RecordDict({"config": ConfigRecord(agreed)})).has_error()
    data = load_site_data(site, config)
    x_all, y = site_matrix(data, names, held_out=False)
    spread = np.abs(x_all[y == 1].mean(0) - x_all[y == 0].mean(0)) / (x_all.std(0) + 1e-12)
    selected = [names[i] for i in np.argsort(-spread)[:4]]  # as the selection phase would, from aggregates
    x, _ = site_matrix(data, names, held_out=False, names=selected)
    grower = trees.TreeGrower(trees.TreeParams(rounds=3, depth=2, bins=24, min_child_cases=10),
                              x.mean(0), x.std(0))
    released, trip = [], 0
    while not grower.done:
        trip += 1
        level, open_nodes = grower.request()
        content = RecordDict({
            "config": ConfigRecord({"features": selected, "features-sha256": sha256_json(selected), "level": level,
                                    "pos-weight": 1.0, "server-round": trip}),
            "arrays": ArrayRecord({**{k: Array(v) for k, v in grower.arrays.items()}, "open": Array(open_nodes)})})
        reply = _send(context, "query.trees", content)
        if reply.has_error():
            return grower, released, str(reply.error.reason), data
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        released.append(arrays)
        assert len(known) == len(released)
        grower.update(arrays["grad"], arrays["hess"], arrays["count"])
    return grower, released, "", data


def _attack(released: list[dict[str, np.ndarray]], known: list[dict[str, frozenset[str]]],
            labels: dict[str, int]) -> dict[str, int]:
    """Patients whose gradient the released cells give exactly, with the diagnosis that gradient's sign reveals
    (p - y < 0 iff HGG), kept when it is right: patient -> diagnosis."""
    patients = sorted(labels)
    found: dict[str, int] = {}
    for arrays, sets in zip(released, known, strict=True):
        rows, values = [], []
        for name, members in sets.items():
            if ":f" not in name:
                continue
            node, f, b = (int(part[1:]) for part in name.split(":")[1:])
            rows.append([1.0 if p in members else 0.0 for p in patients])
            values.append([arrays[key][node, f, b] for key in ("grad", "hess", "count")])
        if not rows:
            continue
        m, v = np.array(rows), np.array(values)
        for j, patient in enumerate(patients):
            target = np.zeros(len(patients))
            target[j] = 1.0
            coef, *_ = np.linalg.lstsq(m.T, target, rcond=None)
            if np.max(np.abs(m.T @ coef - target)) < 1e-8:
                grad, _, count = coef @ v
                guess = 1 if grad < 0 else 0
                if abs(count - 1) < 1e-6 and guess == labels[patient]:
                    found[patient] = guess
    return found


def _labels(data) -> dict[str, int]:
    ids = np.array(data.table.case_ids, dtype=object)[~data.held_out]
    return {str(c): int(v) for c, v in zip(ids, data.table.labels[~data.held_out], strict=True)}


def _naive_reply(x, y, case_ids, units, arrays, level, params, known_only=None):
    """The naive design: each patient routed by its own z; per open node, feature and edge j the sums over the
    patients left of edge j (cumulative), the last cell the node's total; cells of fewer than k (or leaving fewer
    than k on the right) suppressed. Its honest sets: every released cumulative set."""
    model = site_trees.check_model(arrays, params, x.shape[1])
    z = trees.standardise(x, model["mean"], model["scale"])
    bins = trees.bin_of(z, model["edges"])
    tree, open_nodes = int(model["trees"][0]), np.asarray(arrays["open"])
    p = 1 / (1 + np.exp(-trees.margins(model, bins, tree)))
    g, h = p - y, p * (1 - p)
    node = trees.route(model, tree, bins, level)
    o, s, v = len(open_nodes), x.shape[1], params.bins
    sent = {key: np.zeros((o, s, v)) for key in ("grad", "hess", "count")}
    sets: dict[str, frozenset[str]] = {}
    ids = np.array(case_ids, dtype=object)
    for pos in np.flatnonzero(open_nodes > 0.5):
        at = node == pos
        for f in range(s):
            for b in range(v):
                left = at & (bins[:, f] <= b) if b < v - 1 else at
                n_left = int(left.sum())
                if n_left < K or (b < v - 1 and int(at.sum()) - n_left < K):
                    continue
                sent["grad"][pos, f, b], sent["hess"][pos, f, b], sent["count"][pos, f, b] = g[left].sum(), \
                    h[left].sum(), n_left
                sets[f"tree:n{pos}:f{f}:b{b}"] = frozenset(ids[left])
    if known_only is not None:  # declare nothing but the training set; the attacker still knows the sets
        known_only.append(sets)
        return sent, {}
    return sent, sets


def _watch(monkeypatch, known: list, function) -> None:
    """Put ``function`` in place of the site function and keep, for the attacker, the sets behind each reply."""
    def wrapped(*args, **kwargs):
        sent, sets = function(*args, **kwargs)
        if sets:
            known.append(sets)
        return sent, sets
    monkeypatch.setattr(site_trees, "site_reply", wrapped)


def test_block_routed_trees_leave_no_patient_to_a_differencing_attack(site, monkeypatch):
    known: list[dict[str, frozenset[str]]] = []
    _watch(monkeypatch, known, site_trees.site_reply)
    grower, released, refused, data = _coordinator_grows(site, known)
    assert refused == "" and grower.done  # the honest run is answered, every level
    assert (grower.arrays["feature"] >= 0).sum() >= 3  # real trees grew
    assert _attack(released, known, _labels(data)) == {}
    ledger = Ledger(site / ".radfed" / "release", K)
    blocks = [frozenset(b["cases"]) for b in ledger.load()["blocks"].values()]
    for sets in known:  # every node and cell the site released is a union of whole blocks
        for name, members in sets.items():
            assert all(members >= b or not (members & b) for b in blocks), name
    released_sets = ledger.released_sets()
    assert any(len(s) < len(_labels(data)) // 2 for s in released_sets)  # cells finer than a class were released
    assert isolated_group(released_sets, K) is None  # the invariant, over everything the site released


def test_naive_per_case_cumulative_histograms_are_refused_by_the_guard(site, monkeypatch):
    known: list[dict[str, frozenset[str]]] = []
    _watch(monkeypatch, known, _naive_reply)
    _, released, refused, _ = _coordinator_grows(site, known)
    assert released == [] and "single out" in refused and "tree:n0" in refused


def test_naive_design_declaring_only_the_training_set_leaks_patients(site, monkeypatch):
    """What the guard's per-reply checks alone would let out: the same attack then recovers patients' diagnoses
    (so the attack above has teeth)."""
    known: list[dict[str, frozenset[str]]] = []
    monkeypatch.setattr(site_trees, "site_reply",
                        lambda *a, **kw: _naive_reply(*a, **kw, known_only=known))
    grower, released, refused, data = _coordinator_grows(site, known)
    assert refused == "" and released
    hits = _attack(released, known, _labels(data))
    assert len(hits) >= 1, "the differencing attack should recover a patient from per-case cumulative sums"


def test_federation_grows_the_pooled_trees_end_to_end(two_sites, tmp_path):
    """models = "gbt" in a real simulation of two sites: the saved ensemble is the pooled fit over both sites'
    training blocks (same splits, leaves within 1e-9), every level one round trip, each site's held-out AUC the
    model's own there."""
    from client.steps import site_matrix as matrix
    from common.metrics import roc_auc
    from server.audit import verify
    from server.progress import progress, read_entries

    config = {**CONFIG, "select-features": 4, "external-validation": "none", "local-only": "none",
              "recalibration-max-rounds": 0}
    sites = two_sites
    folder = run_federation_in(tmp_path, sites, 2, **config)
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert doc["status"] == "completed", doc["error"]
    saved = torch.load(folder / "model.pt", weights_only=False)
    model = {k: v.numpy() for k, v in saved["state_dict"].items()}
    receipts = [sites / n / ".radfed" / "receipts.jsonl" for n in ("tiny-a", "tiny-b")]
    check = verify(folder / "audit.jsonl", receipts=receipts)
    assert check.ok, check.reason
    assert "gradient-boosted trees" in (folder / "report.md").read_text(encoding="utf-8")
    status = progress(read_entries(folder / "audit.jsonl"))  # radfed status: one round trip per level at most
    assert status["rounds"] == 3 * 2 and status["rounds_are_a_cap"] and status["status"] == "completed"
    levels = [e for e in events(folder) if e["event"] == "tree-level" and not e["data"].get("fold")]
    assert 1 <= len(levels) <= 3 * 2 and int(model["trees"][0]) == 3
    params = trees.TreeParams(rounds=3, depth=2, bins=24, min_child_cases=10)
    run = app_run_config({"data-root": str(sites), **config})
    rows, held = [], []
    for site in sorted(p for p in sites.iterdir() if (p / "manifest.csv").exists()):
        data = load_site_data(site, run)
        agreed = sorted(n for n, ok in zip(data.table.names, np.all(np.isfinite(data.table.values), 0), strict=True)
                        if ok)
        x, y = matrix(data, agreed, held_out=False, names=saved["features"])
        ids = [str(c) for c in np.array(data.table.case_ids, dtype=object)[~data.held_out]]
        units = site_trees.routing_units(ids, y, data.blocking, K)
        zb, yb, wb = trees.block_rows(trees.standardise(x, model["mean"], model["scale"]), y, units)
        rows.append((trees.bin_of(zb, model["edges"]), yb, wb))
        held.append((site.name, *matrix(data, agreed, held_out=True, names=saved["features"])))
    pooled, trips = trees.fit_rows([tuple(np.concatenate(p) for p in zip(*rows, strict=True))], params,
                                   model["mean"], model["scale"])
    assert trips == len(levels)
    assert np.array_equal(pooled["feature"], model["feature"]) and np.array_equal(pooled["split"], model["split"])
    assert np.max(np.abs(pooled["leaf"] - model["leaf"])) < 1e-9 and (model["feature"] >= 0).any()
    [evaluated] = [e["data"]["sites"] for e in events(folder) if e["event"] == "round-evaluate"
                   and not e["data"].get("fold")]
    sent = {name: float(record["auc"]) for name, record in evaluated.items()}
    for name, x_test, y_test in held:
        assert abs(sent[name] - roc_auc(y_test, trees.predict_proba(model, x_test))) < 1e-12


def test_a_site_with_a_dp_budget_never_sends_trees(site):
    """The trees' histograms have no noised form: a site that set its own DP cap refuses them before reading data."""
    (site / "site.yaml").write_text("dp_budget_epsilon: 10\n", encoding="utf-8")
    config = app_run_config({"data-root": str(site.parent), **CONFIG})
    context = Context(run_id=502, node_id=7, node_config={"site-dir": str(site)}, state=RecordDict(),
                      run_config=config)
    reply = _send(context, "query.trees", RecordDict({"config": ConfigRecord({})}))
    assert reply.has_error() and "no noised form" in reply.error.reason

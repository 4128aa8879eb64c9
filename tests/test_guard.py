"""The privacy guard refuses anything the protocol does not declare or that covers fewer than k cases."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.guard import PrivacyError, check_reply
from common import protocol


def _moments(n: int, d: int, extra: dict | None = None, n_class: int | None = None) -> RecordDict:
    arrays = {k: Array(np.zeros(d)) for k in ("mean", "m2", "mean-hgg", "m2-hgg", "mean-bm", "m2-bm")}
    arrays.update(extra or {})
    per_class = n // 2 if n_class is None else n_class
    return RecordDict({"arrays": ArrayRecord(arrays),
                       "metrics": MetricRecord({"n": n, "n-hgg": per_class, "n-bm": n - per_class})})


def test_declared_reply_over_k_cases_passes():
    check_reply(protocol.MOMENTS, _moments(n=12, d=30), k=5, sizes={"d": 30})


def test_fewer_than_k_cases_is_refused():
    with pytest.raises(PrivacyError, match="'n' = 4 is fewer than k = 5"):
        check_reply(protocol.MOMENTS, _moments(n=4, d=30), k=5, sizes={"d": 30})


def test_a_class_with_fewer_than_k_cases_is_refused():
    with pytest.raises(PrivacyError, match="'n-hgg' = 3 is fewer than k = 5"):
        check_reply(protocol.MOMENTS, _moments(n=20, d=30, n_class=3), k=5, sizes={"d": 30})


def test_undeclared_key_is_refused_by_name():
    content = RecordDict({"metrics": MetricRecord({"num-examples": 9, "auc": 0.7, "max-value": 3.0})})
    with pytest.raises(PrivacyError, match="'max-value'"):
        check_reply(protocol.EVALUATE, content, k=5)


def test_undeclared_array_is_refused():
    with pytest.raises(PrivacyError, match="'scores'"):
        check_reply(protocol.MOMENTS, _moments(12, 30, {"scores": Array(np.zeros(30))}), k=5, sizes={"d": 30})


def test_array_sized_by_cases_not_features_is_refused():
    per_case = RecordDict({"arrays": ArrayRecord({"mean": Array(np.zeros(12)), "m2": Array(np.zeros(12))}),
                           "metrics": MetricRecord({"n": 12})})
    with pytest.raises(PrivacyError, match=r"not its declared shape \('d',\) = \(30,\)"):
        check_reply(protocol.MOMENTS, per_case, k=5, sizes={"d": 30})


def test_arrays_before_a_feature_agreement_are_refused():
    with pytest.raises(PrivacyError, match="not yet agreed"):
        check_reply(protocol.MOMENTS, _moments(12, 30), k=5, sizes=None)


def test_model_reply_must_have_the_model_shapes():
    good = {"mean": np.zeros(30), "scale": np.ones(30), "linear.weight": np.zeros((1, 30)),
            "linear.bias": np.zeros(1)}
    reply = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in good.items()}),
                        "metrics": MetricRecord({"num-examples": 9, "train-loss": 0.5})})
    check_reply(protocol.TRAIN, reply, k=5, sizes={"s": 30})
    transposed = {**good, "linear.weight": np.zeros((30, 1))}
    reply["arrays"] = ArrayRecord({k: Array(v) for k, v in transposed.items()})
    with pytest.raises(PrivacyError, match="'linear.weight'"):
        check_reply(protocol.TRAIN, reply, k=5, sizes={"s": 30})


def test_unknown_message_type_and_record_are_refused():
    with pytest.raises(PrivacyError, match="not in the protocol"):
        check_reply("query.dump", RecordDict({}), k=5)
    with pytest.raises(PrivacyError, match="record 'extra'"):
        check_reply(protocol.PLAN, RecordDict({"extra": ConfigRecord({"a": 1})}), k=5)


def test_the_guard_holds_the_sites_own_k_when_the_run_asks_less(tmp_path):
    """site.yaml min_cases_per_class: 8 and a run with k = 5: a moments reply over 6 + 6 cases is refused."""
    import time

    from flwr.app import Context, Message, Metadata
    from flwr.clientapp import ClientApp

    from client import ledger
    from client.guard import privacy_guard
    from radfed.launch import app_run_config

    (tmp_path / "site.yaml").write_text("min_cases_per_class: 8\n")
    app = ClientApp(mods=[privacy_guard])

    @app.query("moments")
    def moments(msg: Message, context: Context) -> Message:
        hgg, bm = frozenset(f"h{i}" for i in range(6)), frozenset(f"b{i}" for i in range(6))
        ledger.declare(msg.metadata.message_id, ledger.Declaration(
            {"train": hgg | bm, "train-hgg": hgg, "train-bm": bm},
            {"n": "train", "n-hgg": "train-hgg", "n-bm": "train-bm"}, None))
        return Message(_moments(n=12, d=3), reply_to=msg)

    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=42, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=3600.0, message_type=protocol.MOMENTS)
    context = Context(run_id=1, node_id=42, node_config={"site-dir": str(tmp_path)}, state=RecordDict(),
                      run_config=app_run_config({"min-cases-per-class": 5}))
    context.state["radfed-site"] = ConfigRecord({"features": ["a", "b", "c"]})
    with pytest.raises(PrivacyError, match="'n-hgg' = 6 is fewer than k = 8"):
        app(Message(RecordDict(), metadata=meta), context)
    assert not (tmp_path / ".radfed" / "outbox.jsonl").exists()  # nothing was logged as sent


def _decision_reply(counts: np.ndarray, kept: np.ndarray, totals: np.ndarray) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({"decision": Array(counts.astype(float)),
                                              "decision-kept": Array(kept.astype(float)),
                                              "decision-totals": Array(totals.astype(float))}),
                       "metrics": MetricRecord({"num-examples": int(totals.sum())})})


def test_decision_counts_pass_only_when_every_step_between_released_thresholds_holds_k_cases_per_class():
    from common import clinical

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(12), np.zeros(12)].astype(int)
    prob = np.clip(0.25 + 0.5 * y + rng.normal(0, 0.2, 24), 0.01, 0.99)
    sent = clinical.site_decision_counts(y, prob, clinical.decision_thresholds(9), 5)
    assert 0 < sent["kept"].sum() < 9  # some thresholds withheld, some released
    check_reply(protocol.EVALUATE, _decision_reply(sent["tp_fp"], sent["kept"], sent["n_pos_neg"]), k=5,
                sizes={"t": 9})

    # release every threshold: somewhere the called set of one class changes by 1 to 4 cases
    raw = np.array([[np.sum((prob >= t) & (y == 1)), np.sum((prob >= t) & (y == 0))]
                    for t in clinical.decision_thresholds(9)], dtype=float)
    with pytest.raises(PrivacyError, match="'decision' changes by [1-4] cases of one class"):
        check_reply(protocol.EVALUATE, _decision_reply(raw, np.ones(9), sent["n_pos_neg"]), k=5, sizes={"t": 9})
    # a count at a threshold marked withheld, and a count that grows with the threshold, are refused too
    hidden = sent["tp_fp"].copy()
    hidden[np.flatnonzero(sent["kept"] == 0)[0]] = raw[np.flatnonzero(sent["kept"] == 0)[0]]
    with pytest.raises(PrivacyError, match="does not mark as released"):
        check_reply(protocol.EVALUATE, _decision_reply(hidden, sent["kept"], sent["n_pos_neg"]), k=5, sizes={"t": 9})
    with pytest.raises(PrivacyError, match="nested sets"):
        check_reply(protocol.EVALUATE, _decision_reply(np.array([[5.0, 5.0], [10.0, 10.0]]), np.ones(2),
                                                       np.array([12.0, 12.0])), k=5, sizes={"t": 2})
    without = _decision_reply(sent["tp_fp"], sent["kept"], sent["n_pos_neg"])
    del without["arrays"]["decision-totals"]
    with pytest.raises(PrivacyError, match="without 'decision-kept' and 'decision-totals'"):
        check_reply(protocol.EVALUATE, without, k=5, sizes={"t": 9})


def test_score_histograms_and_recalibration_terms_are_declared_and_held_to_k():
    from common import clinical

    rng = np.random.default_rng(1)
    y = np.r_[np.ones(11), np.zeros(9)].astype(int)
    prob = rng.uniform(0.05, 0.95, 20)
    h = clinical.site_score_histograms(y, prob, clinical.score_edges(12), 5)
    reply = RecordDict({"arrays": ArrayRecord({"score-start": Array(h["start"]), "score-end": Array(h["end"])}),
                        "metrics": MetricRecord({"num-examples": 20, "sse": 3.0})})
    check_reply(protocol.EVALUATE, reply, k=5, sizes={"g": 12})
    raw = np.vstack([np.bincount(np.clip(np.searchsorted(clinical.score_edges(12), prob[y == c], "right") - 1, 0, 11),
                                 minlength=12) for c in (0, 1)]).astype(float)
    reply["arrays"] = ArrayRecord({"score-start": Array(raw), "score-end": Array(raw)})
    with pytest.raises(PrivacyError, match=r"'score-start' holds a count of [1-4]\.0 cases"):
        check_reply(protocol.EVALUATE, reply, k=5, sizes={"g": 12})

    terms = clinical.site_recalibration_terms(y, prob, np.array([0.0, 1.0]), 5)
    sums = {"gradient": Array(terms["gradient"]), "hessian": Array(terms["hessian"])}
    good = RecordDict({"arrays": ArrayRecord(sums),
                       "metrics": MetricRecord({"n": 20, "loss": terms["loss"]})})
    check_reply(protocol.RECALIBRATE, good, k=5)
    good["metrics"] = MetricRecord({"n": 4, "loss": terms["loss"]})
    with pytest.raises(PrivacyError, match="'n' = 4 is fewer than k = 5"):
        check_reply(protocol.RECALIBRATE, good, k=5)

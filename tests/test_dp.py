"""Differential privacy: the Gaussian mechanism on updates and sums, its zCDP accounting, and the client mod
on real Flower messages (with the real privacy guard around it)."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import ledger
from client.dp import DPError, dp_update_mod
from client.guard import SITE_STATE, privacy_guard
from client.site import SiteError
from common import dp, model
from radfed.launch import app_run_config

TRAINABLE = dp.TRAINABLE_KEYS


# ------------------------------------------------------------------------------------------------
# helpers


def _state(s: int, rng: np.random.Generator, mean_scale: float = 100.0) -> dict[str, np.ndarray]:
    """A model state dict like common.model's: buffers with realistic (large) values, small weights."""
    return {"mean": rng.normal(mean_scale, 10.0, s), "scale": rng.uniform(1.0, 50.0, s),
            "linear.weight": rng.normal(0.0, 0.1, (1, s)), "linear.bias": rng.normal(0.0, 0.1, (1,))}


def _moved(state: dict[str, np.ndarray], rng: np.random.Generator, size: float) -> dict[str, np.ndarray]:
    """``state`` with its trainable arrays moved by an update of L2 norm ``size``."""
    step = {k: rng.normal(0.0, 1.0, state[k].shape) for k in TRAINABLE}
    norm = dp.l2_norm(step.values())
    return {k: (v + step[k] * size / norm if k in step else v.copy()) for k, v in state.items()}


def _flat(state: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(state[k]) for k in TRAINABLE])


# ------------------------------------------------------------------------------------------------
# clipping and noise


def test_clipping_bounds_the_norm_over_all_arrays_and_keeps_the_direction():
    rng = np.random.default_rng(1)
    delta = {"a": rng.normal(0, 3.0, (4, 5)), "b": rng.normal(0, 3.0, (7,))}
    norm = math.sqrt(sum(float((v ** 2).sum()) for v in delta.values()))
    clipped, original = dp.clip_update(delta, 0.5)
    assert original == pytest.approx(norm)
    assert dp.l2_norm(clipped.values()) == pytest.approx(0.5, rel=1e-12)
    assert dp.l2_norm(clipped.values()) <= 0.5 + 1e-12
    for k in delta:  # same direction: a common positive factor for every array
        np.testing.assert_allclose(clipped[k], delta[k] * 0.5 / norm, rtol=1e-12)


def test_small_updates_are_left_unchanged_and_zero_is_fine():
    rng = np.random.default_rng(2)
    delta = {"a": rng.normal(0, 0.01, (3, 3)), "b": np.array([0.02])}
    clipped, original = dp.clip_update(delta, 1.0)
    assert original < 1.0
    for k in delta:
        np.testing.assert_array_equal(clipped[k], delta[k])
    zero, norm = dp.clip_update({"a": np.zeros(3)}, 1.0)
    assert norm == 0.0 and not zero["a"].any()


def test_non_finite_updates_and_bad_clip_norms_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        dp.clip_update({"a": np.array([1.0, np.nan])}, 1.0)
    with pytest.raises(ValueError, match="clip_norm"):
        dp.clip_update({"a": np.ones(2)}, 0.0)


def test_gaussian_noise_has_the_requested_std():
    rng = np.random.default_rng(3)
    noise = dp.gaussian_noise((400_000,), 0.7, rng)
    assert abs(noise.mean()) < 0.01
    assert noise.std() == pytest.approx(0.7, rel=0.01)
    assert not dp.gaussian_noise((3,), 0.0, rng).any()


def test_privatize_update_clips_then_adds_noise_of_std_z_times_c():
    rng = np.random.default_rng(4)
    s, clip, z = 20, 0.1, 1.5
    glob = _state(s, rng)
    local = _moved(glob, rng, size=2.0)  # far beyond the clip
    delta = _flat(local) - _flat(glob)
    clipped = delta * clip / np.linalg.norm(delta)  # computed here, independently of common.dp
    draws = np.stack([_flat(dp.privatize_update(glob, local, TRAINABLE, clip, z, rng)) - _flat(glob)
                      for _ in range(3000)])
    residual = draws - clipped
    assert residual.std() == pytest.approx(z * clip, rel=0.03)  # 63 000 draws: a few % at most
    np.testing.assert_allclose(draws.mean(axis=0), clipped, atol=4 * z * clip / math.sqrt(3000))


def test_privatize_update_never_touches_buffers_and_keeps_layout():
    rng = np.random.default_rng(5)
    glob = _state(8, rng)
    local = _moved(glob, rng, size=0.5)
    out = dp.privatize_update(glob, local, TRAINABLE, 0.1, 1.0, rng)
    assert list(out) == list(local)
    for key in ("mean", "scale"):
        np.testing.assert_array_equal(out[key], local[key])
        np.testing.assert_array_equal(out[key], glob[key])
    for key in TRAINABLE:
        assert out[key].shape == local[key].shape and out[key].dtype == local[key].dtype
        assert not np.array_equal(out[key], local[key])


def test_privatize_update_refuses_what_would_leave_without_noise():
    rng = np.random.default_rng(6)
    glob = _state(4, rng)
    local = _moved(glob, rng, size=0.5)
    changed = {**local, "mean": local["mean"] + 1.0}
    with pytest.raises(ValueError, match="'mean'.*without noise"):
        dp.privatize_update(glob, changed, TRAINABLE, 0.1, 1.0, rng)
    extra = {**local, "secret": np.ones(3)}
    with pytest.raises(ValueError, match="not the received model"):
        dp.privatize_update(glob, extra, TRAINABLE, 0.1, 1.0, rng)
    with pytest.raises(ValueError, match="shape"):
        dp.privatize_update(glob, {**local, "linear.weight": np.zeros((1, 5))}, TRAINABLE, 0.1, 1.0, rng)


def test_trainable_keys_are_exactly_the_models_parameters():
    net = model.build_model(np.zeros(3), np.ones(3))
    assert tuple(name for name, _ in net.named_parameters()) == TRAINABLE
    assert {name for name, _ in net.named_buffers()} == {"mean", "scale"}


# ------------------------------------------------------------------------------------------------
# accounting


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact (ε, δ) of a μ-Gaussian-DP mechanism (Dong, Roth & Su; Balle & Wang):
    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2). T Gaussian releases of Δ/σ compose to μ = √T Δ/σ."""
    def delta_of(eps: float) -> float:
        return _phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2)
    lo, hi = 0.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def test_one_round_at_sigma_z_c_costs_one_over_two_z_squared():
    for z, clip in [(1.0, 0.1), (0.5, 3.0), (2.0, 1.0)]:
        assert dp.zcdp_gaussian(clip, z * clip) == pytest.approx(1 / (2 * z * z))
        assert dp.zcdp_gaussian(2 * clip, z * clip) == pytest.approx(2 / (z * z))


def test_twenty_rounds_z1_delta_1e5_against_hand_computation():
    rho = dp.compose([dp.zcdp_gaussian(1.0, 1.0)] * 20)
    assert rho == pytest.approx(10.0)
    hand = 10.0 + 2.0 * math.sqrt(10.0 * math.log(1e5))  # = 31.4597...
    assert dp.zcdp_to_epsilon(rho, 1e-5) == pytest.approx(hand, rel=1e-12)
    assert hand == pytest.approx(31.4597, abs=1e-4)


def test_simple_conversion_is_the_optimum_of_the_renyi_bound():
    # ρ-zCDP is (α, αρ)-RDP; RDP → DP gives ε = αρ + ln(1/δ)/(α − 1): minimise over α numerically
    for rho, delta in [(0.05, 1e-5), (1.0, 1e-6), (10.0, 1e-5)]:
        alphas = 1 + np.logspace(-4, 4, 200_001)
        numeric = float(np.min(alphas * rho + math.log(1 / delta) / (alphas - 1)))
        assert dp.zcdp_to_epsilon(rho, delta) == pytest.approx(numeric, rel=1e-6)


def test_tight_conversion_lies_between_the_exact_gaussian_and_the_simple_bound():
    for z, rounds, delta in [(1.0, 20, 1e-5), (5.0, 20, 1e-5), (0.5, 1, 1e-6), (10.0, 100, 1e-5)]:
        rho = rounds * dp.zcdp_gaussian(1.0, z)
        exact = _exact_gaussian_epsilon(math.sqrt(rounds) / z, delta)
        tight = dp.zcdp_to_epsilon_cks(rho, delta)
        simple = dp.zcdp_to_epsilon(rho, delta)
        assert exact <= tight < simple  # sound (never below the exact value) and tighter
        alphas = 1 + np.logspace(-5, 5, 400_001)  # the same bound minimised here on a dense grid
        dense = alphas * rho + np.log((alphas - 1) / alphas) - (math.log(delta) + np.log(alphas)) / (alphas - 1)
        assert tight == pytest.approx(float(dense.min()), rel=1e-6)
    assert dp.zcdp_to_epsilon_cks(0.0, 1e-5) == 0.0


def test_account_counts_each_sites_updates_and_reports_both_units():
    account = dp.DPAccount(clip_norm=0.1, noise_multiplier=1.0, delta=1e-5)
    for _ in range(20):
        account.add_round(["a", "b", "c"])
    for _ in range(20):  # a leave-one-site-out fold without "c"
        account.add_round(["a", "b"])
    record = account.to_dict()
    assert record["rounds"] == 40 and record["per_site"]["c"]["rounds"] == 20
    assert record["sigma"] == pytest.approx(0.1)
    assert record["rho"] == pytest.approx(40 * 0.5)
    assert record["rho_any_change"] == pytest.approx(4 * record["rho"])
    assert record["epsilon"] == pytest.approx(20 + 2 * math.sqrt(20 * math.log(1e5)))
    assert record["per_site"]["c"]["epsilon"] == pytest.approx(10 + 2 * math.sqrt(10 * math.log(1e5)))
    assert record["epsilon_cks"] < record["epsilon"]
    json.dumps(record)  # fit for the audit log
    with pytest.raises(ValueError):
        dp.DPAccount(clip_norm=0.1, noise_multiplier=0.0)


def test_settings_from_run_config():
    assert dp.settings_from_config({}) is None
    assert dp.settings_from_config({"dp-noise-multiplier": 0.0, "dp-clip-norm": 1.0}) is None
    settings = dp.settings_from_config({"dp-noise-multiplier": 2, "dp-clip-norm": 0.5})
    assert settings == dp.DPSettings(clip_norm=0.5, noise_multiplier=2.0, delta=1e-5)
    assert settings.sigma == 1.0
    for bad in [{"dp-noise-multiplier": 1.0}, {"dp-noise-multiplier": 1.0, "dp-clip-norm": 0.0},
                {"dp-noise-multiplier": -1.0}, {"dp-noise-multiplier": "1"},
                {"dp-noise-multiplier": 1.0, "dp-clip-norm": 1.0, "dp-delta": 1.0}]:
        with pytest.raises(dp.DPConfigError):
            dp.settings_from_config(bad)


def test_privatize_sum_of_clipped_features_and_its_cost():
    rng = np.random.default_rng(7)
    x = dp.clip_features(rng.normal(0, 2.0, (50, 4)), 3.0)
    assert np.abs(x).max() <= 3.0
    sensitivity = dp.sum_sensitivity(3.0, 4)
    assert sensitivity == pytest.approx(6.0)  # c √d
    # adding one case moves the sum by at most the sensitivity
    worst = np.full((1, 4), 3.0)
    assert np.linalg.norm(np.vstack([x, worst]).sum(0) - x.sum(0)) <= sensitivity + 1e-12
    draws = [dp.privatize_sum(x.sum(0), sensitivity, 12.0, rng) for _ in range(20_000)]
    noisy = np.stack([d[0] for d in draws])
    assert noisy.std(axis=0) == pytest.approx(np.full(4, 12.0), rel=0.03)
    np.testing.assert_allclose(noisy.mean(axis=0), x.sum(0), atol=0.5)
    assert draws[0][1] == pytest.approx(36 / (2 * 144))
    _, rho_count = dp.privatize_sum(np.array(50.0), dp.COUNT_SENSITIVITY, 2.0, rng)
    assert rho_count == pytest.approx(1 / 8)


# ------------------------------------------------------------------------------------------------
# the client mod on real Flower messages


def _incoming(message_type: str, content: RecordDict) -> Message:
    """A message as the SuperNode hands it to the ClientApp (metadata set by the runtime)."""
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=42, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=3600.0, message_type=message_type)
    return Message(content, metadata=meta)


@pytest.fixture(autouse=True)
def _site_dirs_in_tmp_path(tmp_path, monkeypatch):
    """Each test's site folders (``_context``) under pytest's own tmp_path, which pytest prunes, not left in /tmp."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _context(run_config: dict, node_config: dict | None = None, complete: bool = True) -> Context:
    """A node's context: the run config completed with the app's defaults (as Flower sends it) unless
    ``complete`` is False, and a site folder of its own (the mod keeps the site's DP budget there)."""
    site = node_config or {"site-dir": tempfile.mkdtemp(prefix="radfed-dp-site-")}
    return Context(run_id=1, node_id=42, node_config=site, state=RecordDict(),
                   run_config=app_run_config(run_config) if complete else run_config)


def _arrays(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def _train_message(glob: dict[str, np.ndarray]) -> Message:
    return _incoming("train", RecordDict({"arrays": _arrays(glob), "config": ConfigRecord({"server-round": 1})}))


def _handler(local: dict[str, np.ndarray]):
    def call_next(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"arrays": _arrays(local),
                                   "metrics": MetricRecord({"num-examples": 30, "train-loss": 0.5})}),
                       reply_to=msg)
    return call_next


ON = {"dp-noise-multiplier": 1.0, "dp-clip-norm": 0.05, "training": "fedavg"}


def test_mod_off_leaves_the_reply_as_the_handler_made_it():
    rng = np.random.default_rng(8)
    glob = _state(6, rng)
    local = _moved(glob, rng, size=1.0)
    for config in ({}, {"dp-noise-multiplier": 0.0, "dp-clip-norm": 0.05}):
        reply = dp_update_mod(_train_message(glob), _context(config), _handler(local))
        for key, value in _numpy(reply.content["arrays"]).items():
            np.testing.assert_array_equal(value, local[key])
        assert dict(reply.content["metrics"]) == {"num-examples": 30, "train-loss": 0.5}


def test_mod_on_clips_and_noises_the_update_and_adds_nothing():
    rng = np.random.default_rng(9)
    s = 3000  # many coordinates: the noise's std can be checked on one reply
    glob = _state(s, rng)
    local = _moved(glob, rng, size=1.0)
    reply = dp_update_mod(_train_message(glob), _context(ON), _handler(local))
    sent = _numpy(reply.content["arrays"])
    assert list(sent) == list(local)
    for key in ("mean", "scale"):
        np.testing.assert_array_equal(sent[key], glob[key])
    delta = _flat(local) - _flat(glob)
    clipped = delta * 0.05 / np.linalg.norm(delta)
    residual = _flat(sent) - _flat(glob) - clipped
    assert residual.std() == pytest.approx(0.05, rel=0.05)
    assert abs(residual.mean()) < 4 * 0.05 / math.sqrt(s + 1)
    assert not np.allclose(_flat(sent), _flat(local))
    assert dict(reply.content["metrics"]) == {"num-examples": 30, "train-loss": 0.5}  # nothing added
    assert set(reply.content) == {"arrays", "metrics"}
    again = _numpy(dp_update_mod(_train_message(glob), _context(ON), _handler(local)).content["arrays"])
    assert not np.array_equal(again["linear.weight"], sent["linear.weight"])  # fresh noise every time


def test_mod_passes_other_messages_and_errors_through():
    rng = np.random.default_rng(10)
    glob = _state(5, rng)
    for message_type in ("evaluate", "query.moments", "query.plan"):
        msg = _incoming(message_type, RecordDict({"arrays": _arrays(glob), "config": ConfigRecord({})}))
        expected = _handler(_moved(glob, rng, size=3.0))(msg, None)  # type: ignore[arg-type]
        reply = dp_update_mod(msg, _context(ON), lambda m, c, r=expected: r)
        assert reply is expected
    failing = _train_message(glob)
    error = Message(Error(code=0, reason="too few usable cases"), reply_to=failing)
    assert dp_update_mod(failing, _context(ON), lambda m, c: error) is error


def test_mod_fails_closed():
    rng = np.random.default_rng(11)
    glob = _state(5, rng)
    local = _moved(glob, rng, size=1.0)
    error = Message(Error(code=0, reason="x"), reply_to=_train_message(glob))
    with pytest.raises(DPError, match="dp-clip-norm"):
        dp_update_mod(_train_message(glob), _context({"dp-noise-multiplier": 1.0}, complete=False), _handler(local))
    with pytest.raises(DPError, match="without noise"):
        dp_update_mod(_train_message(glob), _context(ON), _handler({**local, "scale": local["scale"] * 2}))
    newton = _incoming("query.newton", RecordDict({"arrays": _arrays(glob), "config": ConfigRecord({})}))
    with pytest.raises(DPError, match="exact training"):  # exact gradient sums would bypass the noise
        dp_update_mod(newton, _context(ON), _handler(local))
    assert dp_update_mod(newton, _context({}), lambda m, c: error).has_error()  # DP off: not the mod's business
    with pytest.raises(DPError, match="no ArrayRecord"):
        dp_update_mod(_incoming("train", RecordDict({"config": ConfigRecord({})})), _context(ON), _handler(local))


def _site_app(mods, local_state: dict) -> ClientApp:
    """A ClientApp whose train handler really trains common.model on a small random training split."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        start = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        rng = np.random.default_rng(12)
        x = rng.normal(0, 1, (40, len(start["mean"])))
        y = (x[:, 0] + rng.normal(0, 1, 40) > 0).astype(float)
        trained, loss = model.train_local(start, x, y, epochs=5, lr=0.05, weight_decay=0.001, pos_weight=1.0)
        record = ArrayRecord({k: Array(v) for k, v in trained.items()})
        local_state["arrays"], local_state["sha256"] = _numpy(record), _hashes(record)
        # the case sets behind the reply, as the real handlers declare them for the guard's release ledger
        cases = frozenset(f"case-{i}" for i in range(40))
        ledger.declare(msg.metadata.message_id, ledger.Declaration({"train": cases}, {"num-examples": "train"}, None))
        return Message(RecordDict({"arrays": record,
                                   "metrics": MetricRecord({"num-examples": 40, "train-loss": loss})}),
                       reply_to=msg)

    return app


def _outbox_hashes(site_dir) -> dict[str, str]:
    lines = (site_dir / ".radfed" / "outbox.jsonl").read_text(encoding="utf-8").splitlines()
    return {k: v["sha256"] for k, v in json.loads(lines[-1])["records"]["arrays"].items()}


def _hashes(record: ArrayRecord) -> dict[str, str]:
    return {k: hashlib.sha256(a.data).hexdigest() for k, a in record.items()}


@pytest.mark.parametrize("guard_outermost", [True, False])
def test_mod_order_the_guard_checks_and_logs_what_really_leaves(tmp_path, guard_outermost):
    s = 6
    net = model.build_model(np.full(s, 100.0), np.full(s, 20.0))
    msg = _incoming("train", RecordDict({"arrays": ArrayRecord(net.state_dict()),
                                         "config": ConfigRecord({"server-round": 1})}))
    context = _context({**ON, "min-cases-per-class": 5}, {"site-dir": str(tmp_path)})
    context.state[SITE_STATE] = ConfigRecord({"selected": [f"f{i}" for i in range(s)]})
    handler_output: dict = {}
    mods = [privacy_guard, dp_update_mod] if guard_outermost else [dp_update_mod, privacy_guard]
    reply = _site_app(mods, handler_output)(msg, context)
    sent, trained = _numpy(reply.content["arrays"]), handler_output["arrays"]
    assert not np.array_equal(sent["linear.weight"], trained["linear.weight"])  # noised
    np.testing.assert_array_equal(sent["mean"], trained["mean"])
    logged = _outbox_hashes(tmp_path)
    if guard_outermost:  # ClientApp(mods=[privacy_guard, dp_update_mod]): the guard sees the private reply
        assert logged == _hashes(reply.content["arrays"])
    else:  # the other order would log (and check) the update before the noise: not what left
        assert logged == handler_output["sha256"]
        assert logged != _hashes(reply.content["arrays"])


def test_a_site_caps_its_own_dp_budget_across_runs(tmp_path):
    """site.yaml dp_budget_epsilon: every noised update is booked at the site; the one that would pass the cap
    is refused whatever run asks, and a run without noise gets no update from that site at all."""
    rng = np.random.default_rng(12)
    glob = _state(5, rng)
    local = _moved(glob, rng, size=1.0)
    rho = dp.zcdp_gaussian(2 * 0.05, 1.0 * 0.05)  # per update, for a change of one case: 2/z^2 = 2
    cap = dp.zcdp_to_epsilon(2.5 * rho, 1e-5)  # room for two updates, not three
    (tmp_path / "site.yaml").write_text(f"dp_budget_epsilon: {cap}\n")
    site = {"site-dir": str(tmp_path)}
    for run in (1, 2):  # two runs, one update each
        context = _context(ON, site)
        context.run_id = run
        dp_update_mod(_train_message(glob), context, _handler(local))
    booked = [json.loads(line) for line in (tmp_path / ".radfed" / "release" / "dp-budget.jsonl").read_text()
              .splitlines()]
    assert [b["run_id"] for b in booked] == [1, 2] and all(b["rho"] == pytest.approx(rho) for b in booked)
    with pytest.raises(DPError, match="this site's DP budget is epsilon"):
        dp_update_mod(_train_message(glob), _context(ON, site), _handler(local))
    assert len((tmp_path / ".radfed" / "release" / "dp-budget.jsonl").read_text().splitlines()) == 2
    with pytest.raises(DPError, match="only with differential privacy"):
        dp_update_mod(_train_message(glob), _context({}, site), _handler(local))


def test_a_damaged_budget_ledger_line_stops_every_noised_release(tmp_path):
    """The budget ledger is what keeps a site under its cap across runs: a line that cannot be read must refuse the
    next noised release (naming the file and line), never count as zero spent."""
    (tmp_path / "site.yaml").write_text("dp_budget_epsilon: 1000\n")
    site = {"site-dir": str(tmp_path)}
    rng = np.random.default_rng(3)
    glob = _state(5, rng)
    dp_update_mod(_train_message(glob), _context(ON, site), _handler(_moved(glob, rng, size=1.0)))
    ledger = tmp_path / ".radfed" / "release" / "dp-budget.jsonl"
    ledger.write_text(ledger.read_text() + "\n" + '{"run_id": 2, "rho": "a lot"}\n')
    with pytest.raises(SiteError, match=r"dp-budget.jsonl line 3 is not a budget entry"):
        dp_update_mod(_train_message(glob), _context(ON, site), _handler(_moved(glob, rng, size=1.0)))

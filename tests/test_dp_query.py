"""Differential privacy on the query phases (common/dp_query.py): the sensitivity of every clipped release, the
noise, the accounting, the guard's view of noised replies, and the attacks it answers (issue 15)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from bench import attacks
from client.guard import PrivacyError, check_release, check_reply
from client.ledger import Declaration, Ledger
from client.steps import load_site_data
from common import combat, dp_query, exact, protocol
from common.canon import sha256_json
from common.dp import zcdp_to_epsilon
from common.runconfig import RunConfigError, parse
from radfed.cli import approve_demo_plan
from radfed.launch import app_run_config

# ------------------------------------------------------------------------------------------------
# sensitivity: adding or removing one case moves each clipped release by at most its stated bound


def _heavy(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Radiomics-like columns: wildly different scales, heavy tails and a few huge outliers."""
    x = rng.standard_cauchy((n, d)) * 10.0 ** rng.uniform(-3, 9, d)
    x[rng.random((n, d)) < 0.05] *= 1e6
    return x


def test_one_case_moves_each_release_by_at_most_its_sensitivity():
    rng = np.random.default_rng(0)
    ratios: dict[str, float] = {}
    for _ in range(300):
        n, d, clip = int(rng.integers(6, 30)), int(rng.integers(1, 40)), float(rng.uniform(0.5, 5.0))
        x = _heavy(rng, n, d)
        y = rng.integers(0, 2, n)
        loc, scale = dp_query.reference(rng.normal(0, 1e3, d), rng.uniform(0, 1e6, d) * (rng.random(d) > 0.1))
        u = dp_query.clip_standardised(x, loc, scale, clip)
        gone = int(rng.integers(n))
        keep = np.arange(n) != gone
        full, less = dp_query.moment_sums(u, y), dp_query.moment_sums(u[keep], y[keep])
        bound = dp_query.moment_sensitivities(clip, d)
        moved = {tag: 0.0 for tag, _ in dp_query.CLASSES}
        for tag, _ in dp_query.CLASSES:
            for kind in ("n", "sum", "sumsq"):
                key = f"{kind}-{tag}"
                change = float(np.linalg.norm(np.atleast_1d(full[key] - less[key])))
                assert change <= bound[kind] * (1 + 1e-12) + 1e-9
                ratios[kind] = max(ratios.get(kind, 0.0), change / bound[kind])
                moved[tag] += change
        assert min(moved.values()) == 0.0  # a case lies in one class: the other class's sums do not move

        cross = dp_query.crossproducts(u) - dp_query.crossproducts(u[keep])
        change = float(np.linalg.norm(cross))
        assert change <= dp_query.crossproduct_sensitivity(clip, d) * (1 + 1e-12)
        ratios["cross"] = max(ratios.get("cross", 0.0), change / dp_query.crossproduct_sensitivity(clip, d))

        coef, pos_weight = rng.normal(0, 5, d + 1), float(rng.uniform(0.2, 5.0))
        a, b = exact.site_terms(u, y, coef, pos_weight), exact.site_terms(u[keep], y[keep], coef, pos_weight)
        d_grad, d_hess = dp_query.newton_sensitivities(clip, d, pos_weight)
        assert np.linalg.norm(a.grad - b.grad) <= d_grad * (1 + 1e-12)
        assert np.linalg.norm(a.hess - b.hess) <= d_hess * (1 + 1e-12)
        ratios["grad"] = max(ratios.get("grad", 0.0), float(np.linalg.norm(a.grad - b.grad)) / d_grad)
    # the bounds are reached (outliers sit at the clip), so they are not loose by construction
    assert ratios["n"] == 1.0 and ratios["sum"] > 0.99 and ratios["sumsq"] > 0.99 and ratios["cross"] > 0.99
    assert ratios["grad"] > 0.5


def test_without_clipping_one_outlier_moves_the_sums_without_bound():
    """Why the clip: the exact moments of one outlier case move the class sum by the outlier itself."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (10, 5))
    x[3] = 1e12
    loc, scale = np.zeros(5), np.ones(5)
    clipped = dp_query.clip_standardised(x, loc, scale, 3.0)
    y = np.ones(10, dtype=int)
    raw_change = np.linalg.norm(x.sum(axis=0) - np.delete(x, 3, axis=0).sum(axis=0))
    clipped_change = np.linalg.norm(clipped.sum(axis=0) - np.delete(clipped, 3, axis=0).sum(axis=0))
    assert raw_change > 1e12 and clipped_change <= dp_query.moment_sensitivities(3.0, 5)["sum"] + 1e-9
    assert dp_query.moment_sums(clipped, y)["n-bm"] == 0.0


# ------------------------------------------------------------------------------------------------
# noise and accounting


def test_noise_has_the_stated_std_in_every_key():
    rng = np.random.default_rng(2)
    z, clip, d = 1.5, 2.0, 3000
    u, y = np.zeros((8, d)), np.array([1, 1, 1, 1, 0, 0, 0, 0])
    arrays, metrics = dp_query.private_moments(u, y, z, clip, rng)
    sens = dp_query.moment_sensitivities(clip, d)
    for tag in ("hgg", "bm"):
        for kind in ("sum", "sumsq"):
            noise = arrays[f"{kind}-{tag}"]  # the exact sums are 0
            assert noise.std() == pytest.approx(z * sens[kind], rel=0.06)
            assert abs(noise.mean()) < 4 * z * sens[kind] / math.sqrt(d)
    counts = np.array([list(dp_query.private_moments(u, y, z, clip, rng)[1].values()) for _ in range(3000)])
    assert counts.mean(axis=0) == pytest.approx([4.0, 4.0], abs=4 * z / math.sqrt(3000))
    assert counts.std(axis=0) == pytest.approx([z, z], rel=0.06)
    m = 80
    cross = dp_query.private_crossproducts(np.zeros((5, m)), z, clip, rng)
    np.testing.assert_array_equal(cross, cross.T)
    upper = cross[np.triu_indices(m)]
    assert upper.std() == pytest.approx(z * dp_query.crossproduct_sensitivity(clip, m), rel=0.06)
    again = dp_query.private_crossproducts(np.zeros((5, m)), z, clip, np.random.default_rng())
    assert not np.array_equal(again, cross)


def test_cost_per_release_and_the_run_account():
    assert dp_query.rho_per_release(protocol.MOMENTS, 2.0) == pytest.approx(3 / 8)
    assert dp_query.rho_per_release(protocol.NEWTON, 1.0) == pytest.approx(1.0)
    assert dp_query.rho_per_release(protocol.CORRELATION, 1.0, changed=True) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="positive"):
        dp_query.rho_per_release(protocol.MOMENTS, 0.0)
    account = dp_query.QueryAccount(noise_multiplier=2.0, clip=3.0, delta=1e-5)
    account.add(protocol.MOMENTS, ["a", "b"])
    account.add(protocol.NEWTON, ["a"])
    account.add(protocol.NEWTON, ["a"])
    doc = account.to_dict()
    rho_a = 3 / 8 + 2 * 2 / 8
    assert doc["per_site"]["a"]["rho"] == pytest.approx(rho_a)
    assert doc["per_site"]["a"]["rho_any_change"] == pytest.approx(4 * rho_a)
    assert doc["per_site"]["b"]["releases"] == {protocol.MOMENTS: 1}
    assert doc["epsilon"] == pytest.approx(rho_a + 2 * math.sqrt(rho_a * math.log(1e5)))
    assert "query.histograms" in doc["withheld"] and "combat" in doc["not_covered"]


def test_the_server_turns_noised_sums_back_into_moments_and_never_crashes():
    rng = np.random.default_rng(3)
    d = 6
    loc, scale = rng.normal(50, 10, d), rng.uniform(1, 20, d)
    x = loc + scale * rng.normal(0, 0.5, (40, d))
    y = np.repeat([1, 0], 20)
    u = dp_query.clip_standardised(x, loc, scale, 3.0)
    sites = []
    for rows in (slice(0, 10), slice(10, 40)):
        arrays, metrics = dp_query.private_moments(u[rows], y[rows], 1e-9, 3.0, rng)
        sites.append({**arrays, **metrics})
    got = dp_query.pool_noised_moments(sites, loc, scale, np.zeros(d, dtype=bool), min_count=10)
    assert got.n == 40
    np.testing.assert_allclose(got.mean, x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(got.std, x.std(axis=0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(got.classwise[1][1], x[:20].mean(axis=0), rtol=1e-6)
    exact_corr = np.corrcoef(x, rowvar=False)
    z_std = dp_query.clip_standardised(x, got.mean, got.std, 10.0)  # nothing clipped: the exact correlation
    np.testing.assert_allclose(dp_query.noised_correlation([dp_query.private_crossproducts(z_std, 1e-9, 10.0, rng)],
                                                           got.n), exact_corr, atol=1e-6)
    # huge noise: negative variances and counts are floored, never NaN
    noisy = [{**a, **m} for a, m in (dp_query.private_moments(u, y, 50.0, 3.0, rng) for _ in range(3))]
    bad = dp_query.pool_noised_moments(noisy, loc, scale, np.arange(d) == 0, min_count=30)
    assert np.all(np.isfinite(bad.std)) and np.all(bad.std[1:] > 0) and bad.std[0] == 0.0
    assert bad.classwise[0][0] >= 15 and np.all(np.isfinite(bad.classwise[0][2]))
    corr = dp_query.noised_correlation([dp_query.private_crossproducts(u, 50.0, 3.0, rng)], 40)
    assert np.all(np.abs(corr) <= 1.0) and np.all(np.diag(corr) == 1.0)
    h = dp_query.psd(np.array([[1.0, 3.0], [3.0, 1.0]]))
    assert np.linalg.eigvalsh(h).min() >= -1e-12


def test_run_config_knobs_are_validated():
    config = parse(app_run_config({"dp-query-noise-multiplier": 1.0}))
    assert config.dp_query and config.dp_query_clip == 3.0
    assert not parse(app_run_config({})).dp_query
    with pytest.raises(RunConfigError, match="needs harmonization = 'combat'"):
        parse(app_run_config({"dp-query-noise-multiplier": 1.0, "harmonization": "none"}))
    with pytest.raises(RunConfigError, match="dp-query-clip"):
        parse(app_run_config({"dp-query-noise-multiplier": 1.0, "dp-query-clip": 0.0}))
    with pytest.raises(RunConfigError, match="dp-query-noise-multiplier"):
        parse(app_run_config({"dp-query-noise-multiplier": -1.0}))


def test_the_plan_a_site_approves_says_what_is_noised_and_what_is_withheld():
    from common.plan import plan_sha256, run_plan, summary
    from common.profile import load_profile

    profile = load_profile("default")
    off = run_plan(app_run_config({}), profile, code="same code")
    on = run_plan(app_run_config({"dp-query-noise-multiplier": 1.0}), profile, code="same code")
    assert plan_sha256(on) != plan_sha256(off)
    assert on["messages"]["query.moments"]["noised"] and "noised" not in off["messages"]["query.moments"]
    assert set(on["messages"]["query.moments"]["arrays"]) == {"sum-hgg", "sumsq-hgg", "sum-bm", "sumsq-bm"}
    assert on["messages"]["query.histograms"]["withheld"] and "withheld" not in off["messages"]["query.histograms"]
    assert "noised" not in on["messages"]["query.combat_fit"]  # ComBat's sums stay exact, and the plan says so
    text = summary(on)
    assert "query.newton (noised: differential privacy)" in text and "query.histograms (withheld)" in text


# ------------------------------------------------------------------------------------------------
# the guard: noised replies are checked on the true case sets


def _noised_moments(d: int) -> RecordDict:
    arrays, metrics = dp_query.private_moments(np.zeros((12, d)), np.repeat([1, 0], 6), 1.0, 3.0,
                                               np.random.default_rng(4))
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       "metrics": MetricRecord(metrics)})


def _sets(n_hgg: int, n_bm: int) -> Declaration:
    hgg = frozenset(f"h{i}" for i in range(n_hgg))
    bm = frozenset(f"b{i}" for i in range(n_bm))
    return Declaration({"train": hgg | bm, "train-hgg": hgg, "train-bm": bm},
                       {"n": "train", "n-hgg": "train-hgg", "n-bm": "train-bm"}, None)


def test_the_guard_takes_noised_replies_only_when_the_run_noises_and_checks_k_on_the_true_sets(tmp_path):
    reply = _noised_moments(30)
    check_reply(protocol.MOMENTS, reply, k=5, sizes={"d": 30}, noised=True)
    with pytest.raises(PrivacyError, match="not declared"):  # a run without DP: the noised keys are not its reply
        check_reply(protocol.MOMENTS, reply, k=5, sizes={"d": 30}, noised=False)
    exact_reply = RecordDict({"arrays": ArrayRecord({k: Array(np.zeros(30)) for k in
                                                     ("mean", "m2", "mean-hgg", "m2-hgg", "mean-bm", "m2-bm")}),
                              "metrics": MetricRecord({"n": 12, "n-hgg": 6, "n-bm": 6})})
    with pytest.raises(PrivacyError, match="not declared"):  # a run with DP: exact sums are refused
        check_reply(protocol.MOMENTS, exact_reply, k=5, sizes={"d": 30}, noised=True)
    with pytest.raises(PrivacyError, match="not sent while the query phases are noised"):
        check_reply(protocol.HISTOGRAMS, RecordDict({}), k=5, noised=True)
    ledger = Ledger(tmp_path / "release", 5)
    with pytest.raises(PrivacyError, match="'n-bm' counts 4 patients, fewer than k = 5"):
        check_release(protocol.MOMENTS, reply, _sets(8, 4), ledger, 1, k=5, noised=True)
    with pytest.raises(PrivacyError, match="does not name the cases"):
        check_release(protocol.MOMENTS, reply, None, ledger, 1, k=5, noised=True)
    check_release(protocol.MOMENTS, reply, _sets(6, 6), ledger, 1, k=5, noised=True)
    assert len(ledger.released_sets()) == 3  # the true sets went into the release ledger


# ------------------------------------------------------------------------------------------------
# the site's real ClientApp: the "k - 1 known" attack, and the budget across runs


def _copy(root: Path, tmp_path: Path) -> Path:
    [site] = [p for p in root.iterdir() if (p / "manifest.csv").exists()]
    return Path(shutil.copytree(site, tmp_path / "sites" / site.name))


@dataclass
class Released:
    names: list[str]
    pooled: combat.PooledEstimates
    moments: RecordDict
    config: dict[str, object]


def _run_to_moments(site: Path, run_id: int, **overrides: object) -> Released:
    """A coordinator's plan, features, both ComBat rounds and moments, sent to the site's real ClientApp (real
    mods: guard, release ledger, DP budget); the site's refusal raises."""
    config = app_run_config({"data-root": str(site.parent), "min-cases-per-class": 5, **overrides})
    approve_demo_plan([site], config)
    context = Context(run_id=run_id, node_id=7, node_config={"site-dir": str(site)}, state=RecordDict(),
                      run_config=config)

    def send(message_type: str, content: RecordDict) -> RecordDict:
        reply = attacks.Coordinator(site)._send(context, message_type, content)
        if reply.has_error():  # the site's refusal, as it leaves the site
            raise RuntimeError(reply.error.reason)
        return reply.content

    send("query.plan", RecordDict({"config": ConfigRecord({})}))
    names = [str(n) for n in send("query.features", RecordDict({"config": ConfigRecord({})}))["config"]["features"]]
    agreed = {"features": names, "features-sha256": sha256_json(names), "n-sites": 1, "site-index": 0}
    fit = send("query.combat_fit", RecordDict({"config": ConfigRecord(agreed)}))
    xtx, xty = fit["arrays"]["xtx"].numpy(), fit["arrays"]["xty"].numpy()
    means = combat.pool_moments([combat.SiteMoments(site=0, n_sites=1, n=int(fit["metrics"]["n"]), xtx=xtx, xty=xty)])
    ss = send("query.combat_residuals", RecordDict({"config": ConfigRecord(agreed),
                                                    "arrays": ArrayRecord({"beta": Array(means.beta)})}))
    pooled = combat.pool_residuals(means, [combat.SiteResiduals(site=0, n=int(ss["metrics"]["n"]),
                                                                ss=ss["arrays"]["ss"].numpy())])
    estimates = ArrayRecord({"beta": Array(pooled.beta), "grand-mean": Array(pooled.grand_mean),
                             "var-pooled": Array(pooled.var_pooled),
                             "zero-variance": Array(pooled.zero_variance.astype(np.float64))})
    moments = send("query.moments", RecordDict({"arrays": estimates,
                                                "config": ConfigRecord({**agreed, "n-pooled": pooled.n})}))
    return Released(names, pooled, moments, config)


def _harmonised_training_hgg(site: Path, run: Released, run_id: int) -> np.ndarray:
    """The site's own harmonised features of its HGG training cases (the truth the attack is scored against)."""
    data = load_site_data(site, run.config)
    params = combat.SiteCombat.from_dict(json.loads((site / ".radfed" / "harmonization" / f"run-{run_id}.json")
                                                    .read_text(encoding="utf-8")))
    rows = ~data.held_out & (data.table.labels == 1)
    return params.apply(data.table.columns(run.names)[rows], None)


def test_k_minus_1_known_recovers_the_last_patient_exactly_without_dp_query_and_not_with_it(tiny_site_root,
                                                                                             tmp_path):
    """A coordinator who knows every HGG training patient but one (k - 1 of a block-sized class) subtracts them
    from the class sum. Without DP on the query phases that is the last patient's features, exactly; with it, the
    error is of the order of the noise's std, on every feature."""
    site = _copy(tiny_site_root, tmp_path)
    plain = _run_to_moments(site, 1)
    truth = _harmonised_training_hgg(site, plain, 1)
    assert 5 <= len(truth) <= 9  # one release block: the k-rule is met
    n = int(plain.moments["metrics"]["n-hgg"])
    recovered = plain.moments["arrays"]["mean-hgg"].numpy() * n - truth[1:].sum(axis=0)
    assert np.max(np.abs(recovered - truth[0]) / np.maximum(np.abs(truth[0]), 1e-9)) < 1e-6  # exact

    z, clip = 1.0, 3.0
    noised = _run_to_moments(site, 2, **{"dp-query-noise-multiplier": z, "dp-query-clip": clip})
    assert set(noised.moments["metrics"]) == {"n-hgg-noised", "n-bm-noised"}  # no exact count left
    truth = _harmonised_training_hgg(site, noised, 2)
    loc, scale = dp_query.reference(noised.pooled.grand_mean, noised.pooled.var_pooled)
    u = dp_query.clip_standardised(truth, loc, scale, clip)  # what the attacker knows, in the released units
    guess = noised.moments["arrays"]["sum-hgg"].numpy() - u[1:].sum(axis=0)
    error = guess - u[0]
    sigma = z * dp_query.moment_sensitivities(clip, len(noised.names))["sum"]
    assert 0.5 < np.median(np.abs(error)) / (0.6745 * sigma) < 1.5  # |N(0, sigma²)|: median 0.6745 sigma
    assert np.mean(np.abs(error) < 0.1 * clip) < 0.03  # almost no feature is even roughly recovered (expect 0.3%)
    outbox = [json.loads(line) for line in (site / ".radfed" / "outbox.jsonl").read_text().splitlines()]
    sent = [e for e in outbox if e["type"] == "query.moments" and e["run_id"] == 2]
    assert set(sent[-1]["records"]["arrays"]) == {"sum-hgg", "sumsq-hgg", "sum-bm", "sumsq-bm"}


def test_two_runs_that_together_pass_the_sites_cap_the_second_is_refused(tiny_site_root, tmp_path):
    site = _copy(tiny_site_root, tmp_path)
    z = 2.0
    rho = dp_query.rho_per_release(protocol.MOMENTS, z, changed=True)  # 4 x 3 / (2 z²) = 1.5
    cap = zcdp_to_epsilon(1.5 * rho, 1e-5)  # room for one noised moments release, not two
    with (site / "site.yaml").open("a", encoding="utf-8") as fh:
        fh.write(f"\ndp_budget_epsilon: {cap}\n")
    on = {"dp-query-noise-multiplier": z}
    _run_to_moments(site, 1, **on)
    booked = [json.loads(line) for line in (site / ".radfed" / "release" / "dp-budget.jsonl").read_text().splitlines()]
    assert [(b["run_id"], b["kind"]) for b in booked] == [(1, "query.moments")]
    assert booked[0]["rho"] == pytest.approx(rho)
    with pytest.raises(RuntimeError, match="this site's DP budget is epsilon") as refused:
        _run_to_moments(site, 2, **on)
    assert "query.moments" in str(refused.value) and "dp_budget_epsilon" in str(refused.value)
    with pytest.raises(RuntimeError, match="sends query.moments only with differential privacy"):
        _run_to_moments(site, 3)
    assert len((site / ".radfed" / "release" / "dp-budget.jsonl").read_text().splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# a whole federation on Flower's simulation engine


def test_a_federation_with_noised_query_phases_completes_and_books_its_budget(tmp_path):
    from federation_helpers import events, run_federation_in

    from radfed import synth

    root = tmp_path / "data"
    for i, spec in enumerate(synth.tiny_sites(2, 12)):  # 2 blocks of 6 per class: 12 training cases per site
        synth.write_site(root, spec, seed=800 + i)
    z, rounds = 0.5, 3
    folder = run_federation_in(tmp_path, root, 2, training="exact", **{
        "select-features": 4, "select-candidates": 10, "external-validation": "none", "local-only": "none",
        "exact-max-rounds": rounds, "dp-query-noise-multiplier": z})
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert doc["status"] == "completed", doc["error"]
    assert doc["final"]["aggregate"]["n"] > 0 and "harmonization" not in doc  # histograms withheld
    log = [(e["event"], e["data"]) for e in events(folder)]
    [moments] = [d for e, d in log if e == "moments"]
    assert moments["noised"] is True
    newton = [d for e, d in log if e == "newton-round"]
    assert len(newton) == rounds and all(d["noised"] and d["objective"] is None for d in newton)
    assert not [d for e, d in log if e == "histograms"]
    [budget] = [d for e, d in log if e == "privacy-budget-query"]
    sites = sorted(p.name for p in root.iterdir())
    expected = {protocol.MOMENTS: 1, protocol.CORRELATION: 1, protocol.NEWTON: rounds}
    assert {s: v["releases"] for s, v in budget["per_site"].items()} == {s: expected for s in sites}
    rho = 3 / (2 * z * z) + 1 / (2 * z * z) + rounds * 2 / (2 * z * z)
    assert budget["per_site"][sites[0]]["rho"] == pytest.approx(rho)
    assert doc["privacy"]["query"]["epsilon"] == pytest.approx(zcdp_to_epsilon(rho, 1e-5))
    assert "withheld" in (folder / "report.md").read_text(encoding="utf-8")
    for site in sites:  # each site booked the same releases (one case changed: 4x), and sent no exact sums
        booked = [json.loads(line) for line in (root / site / ".radfed" / "release" / "dp-budget.jsonl")
                  .read_text().splitlines()]
        assert sum(b["rho"] for b in booked) == pytest.approx(4 * rho)
        outbox = [json.loads(line) for line in (root / site / ".radfed" / "outbox.jsonl").read_text().splitlines()]
        for entry in outbox:
            if entry["type"] in dp_query.MECHANISMS:
                assert set(entry["records"].get("metrics", {})) <= {"n-hgg-noised", "n-bm-noised"}, entry
                assert "mean-hgg" not in entry["records"]["arrays"]

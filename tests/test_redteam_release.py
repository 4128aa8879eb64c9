"""Red team: an honest-but-curious coordinator tries to recover patients across runs (issue 15, findings 1-2).

Each attack is replayed through the site's real ClientApp (bench/attacks.py: real Flower messages, the real
mods, the privacy guard and the release ledger, real pyradiomics features) and scored against the site's
true feature table. On the code before the release rule every one of these recovered a patient (or a group
of fewer than k): two runs whose training sets differ by one case give that case's features exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bench import attacks
from client.ledger import Ledger
from client.sitecheck import check_site
from client.steps import load_site_data, plan_reply
from common.release import isolated_group
from radfed import synth
from radfed.launch import app_run_config

K = 5


def _copy(root: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny site under ``root`` (its feature cache included)."""
    [site] = [p for p in root.iterdir() if (p / "manifest.csv").exists()]
    target = tmp_path / "sites" / site.name
    shutil.copytree(site, target)
    return target


def _site(tmp_path: Path, per_class: int, seed: int) -> Path:
    return synth.write_site(tmp_path / "sites", synth.tiny_sites(1, per_class)[0], seed=seed)


def _truth(site: Path, names: list[str], **config: object) -> dict[str, np.ndarray]:
    """case id -> its true features over ``names`` (every usable case of the site)."""
    data = load_site_data(site, app_run_config({"data-root": str(site.parent), **config}))
    return dict(zip(data.table.case_ids, data.table.columns(names), strict=True))


def _training_classes(site: Path, **config: object) -> dict[str, set[str]]:
    data = load_site_data(site, app_run_config({"data-root": str(site.parent), **config}))
    sets = data.case_sets("train")
    return {"hgg": set(sets["train-hgg"]), "bm": set(sets["train-bm"])}


def _ledger_holds(site: Path) -> None:
    """The invariant itself, over everything the site released in every run."""
    sets = Ledger(site / ".radfed" / "release", K).released_sets()
    assert sets and isolated_group(sets, K) is None


def test_test_fraction_sweep_recovers_no_patient(tiny_site_root, tmp_path):
    """Finding 1 as reported: runs that differ only in test-fraction moved exactly one case out of training."""
    site = _copy(tiny_site_root, tmp_path)
    coordinator = attacks.Coordinator(site)
    fractions = [round(0.20 + 0.02 * i, 2) for i in range(15)]
    for fraction in fractions:
        coordinator.run(**{"test-fraction": fraction, "harmonization": "none"})
    done = [r for r in coordinator.runs if not r.refused]
    assert len(done) == len(fractions), [r.refused for r in coordinator.runs]  # honest runs are not blocked
    truth = _truth(site, done[0].features, harmonization="none")
    hits = [f for f in attacks.subtract_pairs(coordinator, truth) if f["patient"]]
    assert hits == [], f"recovered {hits[0]['patient']} from test-fraction {hits[0]['runs']}" if hits else ""
    # even knowing which patients each run used, no patient lies in the span of what was released
    members = [_training_classes(site, **{"test-fraction": f, "harmonization": "none"}) for f in fractions]
    assert attacks.solve_patients(coordinator, members, truth) == {}
    _ledger_holds(site)


def test_cross_products_before_combat_recover_no_patient(tiny_site_root, tmp_path):
    """The cross-products before ComBat that a leave-one-site-out run's main run asks for with its correlation query
    (``raw-crossproducts``) are second moments over the training cases: with the moments' sums they give Σ x xᵀ, from
    which two runs one patient apart would give that patient's x xᵀ. Over a test-fraction sweep each run's release
    is over exactly the training cases it declares, and even knowing which patients each run used no patient's
    x xᵀ lies in the span of what was released; the same solver does find a patient two runs apart by one."""
    site = _copy(tiny_site_root, tmp_path)
    coordinator = attacks.Coordinator(site)
    fractions = [round(0.20 + 0.04 * i, 2) for i in range(8)]
    for fraction in fractions:
        coordinator.run(raw_crossproducts=6, **{"test-fraction": fraction, "harmonization": "none"})
    assert not [r.refused for r in coordinator.runs if r.refused]  # honest runs are not blocked
    truth = _truth(site, coordinator.runs[0].features[:6], harmonization="none")
    members = [set().union(*_training_classes(site, **{"test-fraction": f, "harmonization": "none"}).values())
               for f in fractions]
    for run, member in zip(coordinator.runs, members, strict=True):
        want = sum(np.outer(truth[c], truth[c]) for c in member)
        np.testing.assert_allclose(run.second, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    assert attacks.solve_second_moments(coordinator, members, truth) == {}
    _ledger_holds(site)

    # the attack where the data allow it: two releases whose sets differ by one patient give that patient's x xᵀ
    ids = sorted(members[0])
    fake = attacks.Coordinator(site)
    fake.runs = [attacks.SiteRun(config={}, second=sum(np.outer(truth[c], truth[c]) for c in cases))
                 for cases in (ids[1:], ids)]
    assert list(attacks.solve_second_moments(fake, [set(ids[1:]), set(ids)], truth)) == [ids[0]]


def test_split_seed_sweep_recovers_no_patient(tiny_site_root, tmp_path):
    """Many split seeds (more than a class has patients): on the old split each seed drew a new random training
    set, and enough of them
    made every patient's indicator a combination of released sets."""
    site = _copy(tiny_site_root, tmp_path)
    coordinator = attacks.Coordinator(site)
    seeds = list(range(16))
    for seed in seeds:
        coordinator.run(**{"split-seed": seed, "harmonization": "none"})
    assert all(not r.refused for r in coordinator.runs), [r.refused for r in coordinator.runs]
    truth = _truth(site, coordinator.runs[0].features, harmonization="none")
    members = [_training_classes(site, **{"split-seed": s, "harmonization": "none"}) for s in seeds]
    assert attacks.solve_patients(coordinator, members, truth) == {}
    assert [f for f in attacks.subtract_pairs(coordinator, truth) if f["patient"]] == []
    _ledger_holds(site)


def _set_sex(site: Path, males: set[str]) -> None:
    """Rewrite the manifest's sex column: M for ``males``, F for everyone else."""
    manifest = site / "manifest.csv"
    lines = manifest.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
    sex = header.index("sex")
    for row in rows:
        row[sex] = "M" if row[0] in males else "F"
    manifest.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


def test_covariate_filter_and_all_cases_evaluation_recover_no_patient(tmp_path):
    """A covariate level spec that leaves out one training patient ("sex=F|X" drops the only man), and the
    leave-one-site-out evaluation on all cases, whose case set such a filter also moves by one."""
    site = _site(tmp_path, 15, seed=41)
    plain = {"harmonization": "none"}
    train = _training_classes(site, **plain)
    target = sorted(train["hgg"])[0]
    _set_sex(site, {target})
    coordinator = attacks.Coordinator(site)
    first = coordinator.run(**plain)
    truth = _truth(site, first.features, **plain)
    state = _model(first.features[:4], truth)
    coordinator.runs.clear()
    runs = [coordinator.run(evaluate_state=state, **plain),
            coordinator.run(evaluate_state=state, harmonization="combat", **{"combat-covariates": "sex=F|X"})]
    assert all(not r.refused for r in runs), [r.refused for r in runs]
    assert target not in load_site_data(site, app_run_config({"data-root": str(site.parent), "harmonization": "combat",
                                                              "combat-covariates": "sex=F|X"})).table.case_ids
    hits = [f for f in attacks.subtract_pairs(coordinator, truth) if f["patient"]]
    assert hits == []
    # the training sets and the all-cases evaluation sets differ by whole blocks (>= k patients) or not at all
    for key in ("n-hgg", "n-bm"):
        assert abs(runs[0].counts[key] - runs[1].counts[key]) in {0} | set(range(K, 100))
    dn = runs[0].evaluation["num-examples"] - runs[1].evaluation["num-examples"]
    assert dn == 0 or dn >= K, f"the all-cases evaluations differ by {dn} patient(s): their loss sums isolate them"
    _ledger_holds(site)


def _model(names: list[str], truth: dict[str, np.ndarray]) -> dict[str, object]:
    from common import model

    rows = np.array(list(truth.values()))[:, :len(names)]
    net = model.build_model(rows.mean(axis=0), rows.std(axis=0) + 1e-9)
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    state["linear.weight"] = np.linspace(-1, 1, len(names), dtype=np.float32)[None, :]
    return {"features": names, **state}


def test_covariate_groups_that_isolate_two_patients_are_refused_at_the_plan(tmp_path):
    """XᵀY sums the features of each covariate level's training cases. Two split seeds whose level groups
    differ by two patients would give their difference; the site refuses the second plan before it reads any
    image, and its guard would refuse the reply."""
    site = _site(tmp_path, 15, seed=43)
    ids = [line.split(",")[0] for line in (site / "manifest.csv").read_text(encoding="utf-8").splitlines()[1:]]
    data = load_site_data(site, app_run_config({"data-root": str(site.parent), "harmonization": "none"}))
    blocking = data.blocking
    hgg_blocks = sorted((b for b, (label, _) in blocking.blocks.items() if label == 1))
    assert len(hgg_blocks) == 3 and set(data.table.case_ids) == set(ids)

    def held(seed: int) -> str:
        mask = blocking.held_out(data.table.case_ids, 0.3, seed)
        [block] = [b for b in hgg_blocks if mask[data.table.case_ids.index(blocking.blocks[b][1][0])]]
        return block

    seed_a = 0
    seed_b = next(s for s in range(1, 50) if held(s) != held(seed_a))
    common = next(b for b in hgg_blocks if b not in {held(seed_a), held(seed_b)})
    in_a_only, in_b_only = held(seed_b), held(seed_a)  # training in run a = all but held(a)
    males = set(sorted(blocking.blocks[common][1])[:4]) | {blocking.blocks[in_a_only][1][0],
                                                           blocking.blocks[in_b_only][1][0]}
    _set_sex(site, males)  # 5 training men in each run: a k-anonymous level both times
    coordinator = attacks.Coordinator(site)
    covariates = {"harmonization": "combat", "combat-covariates": "sex=F|M"}
    first = coordinator.run(combat=True, **{**covariates, "split-seed": seed_a})
    assert not first.refused, first.refused
    second = coordinator.run(combat=True, **{**covariates, "split-seed": seed_b})
    assert "refuses this run plan" in second.refused and "single out 2 patients" in second.refused
    config, _ = plan_reply(site, app_run_config({"data-root": str(site.parent), **covariates, "split-seed": seed_b}))
    assert config["status"] == "ineligible"
    # the level sums of the first run split a block (4 men, 1 woman in the common block): seed_b's other split
    # would now isolate that woman and a man even without the covariate; the first run's split still runs
    plain_b = coordinator.run(**{"harmonization": "none", "split-seed": seed_b})
    assert "refuses this run plan" in plain_b.refused and "single out 2 patients" in plain_b.refused
    assert not coordinator.run(**{"harmonization": "none", "split-seed": seed_a}).refused
    _ledger_holds(site)


def test_duplicated_patients_count_once_and_conflicts_are_refused(tiny_site_root, tmp_path):
    """Finding 2: nine rows of one HGG patient and nine of one BM patient passed as 18 cases, and the class
    mean was that patient's features. Rows with the same images are one patient."""
    site = _copy(tiny_site_root, tmp_path)
    manifest = site / "manifest.csv"
    header, *rows = manifest.read_text(encoding="utf-8").splitlines()
    hgg = next(r for r in rows if r.split(",")[1] == "HGG")
    bm = next(r for r in rows if r.split(",")[1] == "BM")
    clones = [f"dup-h{i}," + hgg.split(",", 1)[1] for i in range(11)] + \
             [f"dup-b{i}," + bm.split(",", 1)[1] for i in range(11)]
    manifest.write_text("\n".join([header, *clones]) + "\n", encoding="utf-8")
    check = check_site(site)
    assert len(check.usable) == 2 and check.exit_code == 3
    kinds = {p.case_id: p.kind for p in check.problems}
    assert kinds["dup-h3"] == "duplicate-patient" and kinds["dup-b7"] == "duplicate-patient"
    config, counts = plan_reply(site, app_run_config({"data-root": str(site.parent)}))
    assert config["status"] == "ineligible" and counts == {"n-hgg": 1, "n-bm": 1, "n-problems": 20}

    # a repeated id with another diagnosis: which row is right is unknown, so neither is used
    fields = hgg.split(",")
    conflict = ",".join([fields[0], "BM", *fields[2:]])
    manifest.write_text("\n".join([header, *rows, conflict]) + "\n", encoding="utf-8")
    check = check_site(site)
    assert fields[0] not in {c.case_id for c in check.usable}
    assert any(p.case_id == fields[0] and p.kind == "conflicting-diagnosis" for p in check.problems)

    # the same images under two ids and two diagnoses: neither is used
    other = ",".join(["copy-of-" + fields[0], "BM", *fields[2:]])
    manifest.write_text("\n".join([header, *rows, other]) + "\n", encoding="utf-8")
    check = check_site(site)
    assert {fields[0], "copy-of-" + fields[0]}.isdisjoint(c.case_id for c in check.usable)
    assert sum(p.kind == "conflicting-diagnosis" for p in check.problems) == 2


@pytest.mark.parametrize("change", ["drop-one", "relabel-one"])
def test_a_frozen_block_is_used_whole_or_not_at_all(tiny_site_root, tmp_path, change):
    """After a run, a case that stops being usable (or changes class) takes its whole release block out."""
    site = _copy(tiny_site_root, tmp_path)
    coordinator = attacks.Coordinator(site)
    assert not coordinator.run(harmonization="none").refused
    manifest = site / "manifest.csv"
    header, *rows = manifest.read_text(encoding="utf-8").splitlines()
    victim = rows[0].split(",")
    if change == "drop-one":
        rows = rows[1:]
    else:
        rows[0] = ",".join([victim[0], "BM" if victim[1] == "HGG" else "HGG", *victim[2:]])
    manifest.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    result = coordinator.run(harmonization="none")
    # 12 per class = 2 blocks of 6: losing one block leaves one, too few to split: the site cannot take part
    assert result.refused and "release block" in result.refused
    _ledger_holds(site)


def test_cross_validation_folds_recover_no_patient(tmp_path):
    """Every subset a later feature aggregates over goes through the same rule: cross-validation folds. The
    coordinator varies cv-folds, cv-repeats and split-seed between runs and asks for every fold's training moments, also
    beside held-out-split runs; the folds are whole release blocks, so no two released sets differ by fewer
    than k patients. A fold assignment by patient (what a textbook stratified k-fold does) would have."""
    site = _site(tmp_path, 15, seed=43)  # 15 per class: three release blocks of k = 5 each
    plain = {"harmonization": "none", "min-cases-per-class": K}
    coordinator = attacks.Coordinator(site)
    for folds, seed, repeats in ((2, 1, 1), (3, 1, 1), (2, 2, 2), (3, 5, 1)):
        for r in range(repeats):
            for v in range(folds):
                coordinator.run(fold=f"cv:{r}:{v}", **plain, **{"internal-validation": "cv", "cv-folds": folds,
                                                                 "split-seed": seed, "cv-repeats": repeats})
    for fraction in (0.3, 0.5):
        coordinator.run(**plain, **{"test-fraction": fraction})
    assert all(not r.refused for r in coordinator.runs), [r.refused for r in coordinator.runs]
    truth = _truth(site, coordinator.runs[0].features, **plain)
    assert [f for f in attacks.subtract_pairs(coordinator, truth) if f["patient"]] == []
    for a in coordinator.runs:  # every pair of released training sets differs by 0 or >= k patients per class
        for b in coordinator.runs:
            for key in ("n-hgg", "n-bm"):
                assert abs(a.counts[key] - b.counts[key]) in {0} | set(range(K, 100))
    _ledger_holds(site)

    # the rule is what holds: textbook folds dealt by patient (5-fold, two seeds; each fold's test part has 6 >= k
    # patients) would, beside what the site released, single out a group of fewer than k
    from sklearn.model_selection import StratifiedKFold

    data = load_site_data(site, app_run_config({"data-root": str(site.parent), **plain}))
    ids, y = np.array(data.table.case_ids), data.table.labels
    by_patient = [frozenset(ids[train]) for seed in (1, 2)
                  for train, _ in StratifiedKFold(5, shuffle=True, random_state=seed).split(ids, y)]
    released = Ledger(site / ".radfed" / "release", K).released_sets()
    assert isolated_group([*released, *by_patient], K) is not None

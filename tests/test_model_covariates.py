"""Clinical covariates as model inputs (``model-covariates``): each site codes them from its manifest, they join the
radiomics features after ComBat (never adjusted), their pooled standardisation from the sites' sums equals the one
computed from every case in one place, a case without a value is named, and a level under k is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client import compute, level_groups, steps
from client.cases import Case
from client.extract import FeatureTable
from client.site import Site, SiteError
from common import covariates as cv
from common import moments
from common.runconfig import RunConfigError, parse
from radfed.launch import app_run_config

SPEC = "age,sex=F|M"


def _site(root: Path, name: str, n: int, rng: np.random.Generator, missing: str | None = None):
    """A site of n cases with random features, ages and sexes (``missing``: that case has no age)."""
    ids = [f"{name}-{i:02d}" for i in range(n)]
    labels = np.arange(n) % 2
    ages = np.round(rng.uniform(30, 80, n), 1)
    sexes = np.where(np.arange(n) % 3 == 0, "M", "F")
    cases = [Case(c, "HGG" if y else "BM", {}, root / "mask.nii.gz",
                  {"sex": str(s), **({} if c == missing else {"age": str(a)})})
             for c, y, a, s in zip(ids, labels, ages, sexes, strict=True)]
    (root / name / ".radfed").mkdir(parents=True)  # the site's output_dir, made by extraction in a run
    site = Site(name, root / name, cases)
    names = ["t1c/enhancing/f1", "t1c/enhancing/f2", "flair/edema/f3"]
    table = FeatureTable(ids, labels.astype(np.int64), names, rng.normal(5, 2, (n, 3)))
    return site, table, ages, sexes


def test_coding_and_pooled_standardisation_equal_one_pooled_computation(tmp_path):
    rng = np.random.default_rng(18)
    spec = cv.parse(SPEC, "model-covariates")
    inputs = cv.clinical_columns(spec)
    assert inputs == ["clinical/sex=M", "clinical/age"]

    def harmonize(x, _c):  # a stand-in for a site's ComBat: it must touch the radiomics columns only
        return 3.0 * x - 1.0

    x_sites, ref_sites, sent = [], [], []
    for i, n in enumerate((24, 31)):
        site, table, ages, sexes = _site(tmp_path, f"s{i}", n, rng)
        table, clinical = steps.code_covariates(site, table, spec, "model-covariates")
        held_out = np.arange(n) % 4 == 3
        data = steps.SiteData(site, None, table, held_out, clinical=clinical,  # type: ignore[arg-type]
                              clinical_names=tuple(inputs))
        agreed = [*table.names, *inputs]
        x, y = steps.site_matrix(data, agreed, held_out=False, harmonize=harmonize)
        arrays, counts = compute.moments_reply(x, y)
        sent.append((counts["n"], arrays["mean"], arrays["m2"]))
        # the reference: coded by hand from the raw values, beside the harmonised radiomics features
        train = ~held_out
        ref = np.column_stack([harmonize(table.values, None), (sexes == "M").astype(float), ages])[train]
        ref_sites.append(ref)
        x_sites.append(x)
        # the model's inputs in any order (a selection): clinical columns picked by name, after ComBat
        picked, _ = steps.site_matrix(data, agreed, held_out=False, names=["clinical/age", "flair/edema/f3"],
                                      harmonize=harmonize)
        np.testing.assert_array_equal(picked, ref[:, [4, 2]])
    pooled = np.vstack(ref_sites)
    np.testing.assert_array_equal(np.vstack(x_sites), pooled)
    mean, std = moments.pooled_mean_std(*zip(*sent, strict=True))
    np.testing.assert_allclose(mean, pooled.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, pooled.std(axis=0, ddof=1), rtol=1e-12)


def test_a_case_without_a_model_covariate_is_named(tmp_path):
    rng = np.random.default_rng(4)
    site, table, _, _ = _site(tmp_path, "s", 12, rng, missing="s-05")
    table, clinical = steps.code_covariates(site, table, cv.parse(SPEC, "model-covariates"), "model-covariates")
    assert "s-05" not in table.case_ids and clinical.shape == (11, 2)
    problem = next(p for p in table.problems if p.case_id == "s-05")
    assert "no age value" in problem.reason and "model-covariates" in problem.reason
    assert "fill in sex, age for s-05" in problem.fix and problem.kind == "bad-covariate"
    errors = json.loads(site.files.errors.read_text(encoding="utf-8"))
    assert [p["case_id"] for p in errors["problems"]] == ["s-05"]


def test_a_level_under_k_is_refused_and_levels_are_declared(tmp_path):
    rng = np.random.default_rng(5)
    site, table, _, sexes = _site(tmp_path, "s", 24, rng)
    spec = cv.parse(SPEC, "model-covariates")
    table, clinical = steps.code_covariates(site, table, spec, "model-covariates")
    run = parse(app_run_config({"model-covariates": SPEC, "min-cases-per-class": 5}))
    held_out = np.zeros(24, dtype=bool)
    data = steps.SiteData(site, None, table, held_out, clinical=clinical,  # type: ignore[arg-type]
                          clinical_names=tuple(cv.clinical_columns(spec)))
    groups = level_groups.model_groups(data, spec, steps.min_cases(site, run))
    assert groups["train|clinical/sex=M"] == frozenset(np.array(table.case_ids)[sexes == "M"])
    few_men = held_out | ((sexes == "M") & (np.arange(24) > 6))  # 3 men left in training
    with pytest.raises(SiteError, match=r"sex=M \(3 cases\).*model-covariates"):
        level_groups.model_groups(steps.SiteData(site, None, table, few_men, clinical=clinical,  # type: ignore[arg-type]
                                                 clinical_names=data.clinical_names), spec, steps.min_cases(site, run))


def test_the_knob_is_validated_and_named():
    assert parse(app_run_config({"model-covariates": SPEC})).clinical_inputs == ["clinical/sex=M", "clinical/age"]
    assert parse(app_run_config()).clinical_inputs == []
    with pytest.raises(RunConfigError, match="model-covariates entry 'sex='"):
        parse(app_run_config({"model-covariates": "sex="}))
    with pytest.raises(RunConfigError, match="model-covariates.*diagnosis"):
        parse(app_run_config({"model-covariates": "diagnosis"}))
    with pytest.raises(RunConfigError, match="model-covariates cannot be used with dp-query"):
        parse(app_run_config({"model-covariates": "age", "dp-query-noise-multiplier": 1.0}))


@pytest.mark.parametrize("name", ["logistic-l2:radiomics-only", "mlp:clinical-only"])
def test_a_variant_widened_to_every_input_scores_as_on_its_own(name):
    """query.compare scores every model on the combined model's inputs: a variant widened with zero weights must give
    exactly its own scores."""
    from common import families

    rng = np.random.default_rng(9)
    full = ["t1c/enhancing/f1", "flair/edema/f3", "clinical/sex=M", "clinical/age"]
    own = full[:2] if name.endswith("radiomics-only") else full[2:]
    arrays = {"mean": rng.normal(size=2), "scale": rng.uniform(0.5, 2, 2)}
    if families.family(name).linear:
        arrays |= {"linear.weight": rng.normal(size=(1, 2)), "linear.bias": rng.normal(size=1)}
    else:
        arrays |= {"hidden.weight": rng.normal(size=(3, 2)), "hidden.bias": rng.normal(size=3),
                   "output.weight": rng.normal(size=(1, 3)), "output.bias": rng.normal(size=1)}
    x = rng.normal(size=(7, 4))
    wide = families.widen(arrays, own, full)
    np.testing.assert_allclose(families.predict_proba(name, wide, x),
                               families.predict_proba(name, arrays, x[:, [full.index(n) for n in own]]), rtol=1e-12)
    assert parse(app_run_config({"model-covariates": SPEC})).compared == [
        "logistic-l2", "logistic-l2:radiomics-only", "logistic-l2:clinical-only"]
    with pytest.raises(RunConfigError, match="variants come with model-covariates"):
        parse(app_run_config({"models": "logistic-l2:clinical-only"}))

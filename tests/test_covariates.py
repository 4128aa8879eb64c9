"""ComBat covariates: the run's spec, each site's coding of its manifest values (checked against neuroCombat's
own design matrix), the k rule on the groups they define, and the manifest columns reaching the cases."""

from __future__ import annotations

import numpy as np
import pytest
from neuroCombat.neuroCombat import make_design_matrix

from client.site import load_site
from common import covariates as cv
from radfed import synth


def test_spec_is_put_in_neurocombat_order_and_bad_specs_are_named():
    spec = cv.parse(" age , sex=M|F, grade=III|I|II ")
    assert [c.name for c in spec] == ["sex", "grade", "age"]  # categorical first, as neuroCombat's design
    assert spec[0].levels == ("F", "M") and spec[1].levels == ("I", "II", "III")
    assert cv.columns(spec) == ["sex=M", "grade=II", "grade=III", "age"]
    assert cv.describe(spec) == "sex=F|M,grade=I|II|III,age" and cv.parse(cv.describe(spec)) == spec
    assert cv.parse("") == [] and cv.parse(" , ") == []
    for bad, says in [("diagnosis", "leak the label"), ("Label", "leak the label"), ("sex=F", "two or more"),
                      ("sex=F|F", "distinct"), ("sex=", "give the levels"), ("age,age", "twice"),
                      ("2age", "starts with a letter"), ("sex=F||M", "non-empty")]:
        with pytest.raises(cv.CovariateError, match=says):
            cv.parse(bad)


def test_coding_equals_neurocombat_design_matrix():
    rng = np.random.default_rng(3)
    n = 40
    ages = np.round(rng.uniform(20, 80, n), 1)
    sexes, grades = rng.choice(["F", "M"], n), rng.choice(["I", "II", "III"], n)
    spec = cv.parse("age,sex=F|M,grade=I|II|III")
    ours = np.array([cv.code_case(spec, {"age": str(a), "sex": s, "grade": g})
                     for a, s, g in zip(ages, sexes, grades, strict=True)])
    table = np.column_stack([np.zeros(n, dtype=object), ages.astype(object), sexes, grades])
    theirs = make_design_matrix(table, 0, [2, 3], [1], None)[:, 1:]  # drop the (single) batch column
    np.testing.assert_allclose(ours, theirs, rtol=1e-7)  # neuroCombat casts ages to float32


def test_bad_values_name_every_covariate():
    spec = cv.parse("age,sex=F|M")
    with pytest.raises(ValueError) as err:
        cv.code_case(spec, {"age": "sixty", "sex": "X"})
    assert "sex 'X' is not one of the agreed levels F|M" in str(err.value)
    assert "age 'sixty' is not a number" in str(err.value)
    for values, says in [({"sex": "F"}, "no age value"), ({"age": "nan", "sex": "F"}, "not a finite number"),
                         ({"age": " ", "sex": "M"}, "no age value")]:
        with pytest.raises(ValueError, match=says):
            cv.code_case(spec, values)
    assert cv.code_case(spec, {"age": " 63 ", "sex": "M", "other": "ignored"}).tolist() == [1.0, 63.0]


def test_small_groups_are_levels_and_pairs_of_levels_under_k():
    spec = cv.parse("age,sex=F|M,scanner=A|B")
    rows = [("F", "A")] * 6 + [("M", "A")] * 5 + [("M", "B")] * 2
    design = np.array([cv.code_case(spec, {"age": "50", "sex": s, "scanner": m}) for s, m in rows])
    assert cv.small_groups(spec, design, 5) == ["scanner=B (2 cases)", "sex=M & scanner=B (2 cases)"]
    assert cv.small_groups(spec, design, 2) == []
    assert cv.small_groups(spec, design, 7) == ["sex=F (6 cases)", "scanner=B (2 cases)", "sex=F & scanner=A (6 cases)",
                                                "sex=M & scanner=A (5 cases)", "sex=M & scanner=B (2 cases)"]
    # continuous covariates define no groups
    assert cv.small_groups(cv.parse("age"), np.array([[50.0], [60.0]]), 5) == []


def test_manifest_columns_reach_the_cases(tmp_path):
    spec = synth.tiny_sites(1, 3)[0]
    site = load_site(synth.write_site(tmp_path, spec, seed=1), ("t1c", "flair", "adc"))
    assert len(site.cases) == 6
    for case in site.cases:
        assert set(case.covariates) == {"age", "sex"}
        assert 18 <= int(case.covariates["age"]) <= 90 and case.covariates["sex"] in ("F", "M")

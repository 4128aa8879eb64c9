"""The report's "Model families" section, from metrics.json ``families`` alone: one comparison table (family x AUC,
sensitivity, specificity, Brier, calibration slope; internal and leave-one-site-out, with 95% intervals), a forest
plot of each family's AUC difference to the reference with its interval, and the chosen model with its rule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.families import FAMILIES
from server import plots
from server.report_blocks import Block, Figure, Section, Table, Text, as_dict, finite_number

RULES = {"internal-auc": "the highest internal validated AUC (ties to the first listed), fixed in the plan before "
                         "external validation"}


def _num(value: Any, digits: int = 3) -> str:
    v = finite_number(value)
    return "n/a" if v is None else f"{v:.{digits}f}"


def _with_ci(value: Any, ci: Any) -> str:
    ci = ci if isinstance(ci, list | tuple) and len(ci) == 2 else [None, None]
    if finite_number(value) is None:
        return "n/a"
    if finite_number(ci[0]) is None or finite_number(ci[1]) is None:
        return _num(value)
    return f"{_num(value)} ({_num(ci[0])}–{_num(ci[1])})"


def _cells(row: Mapping[str, Any]) -> list[str]:
    ci = as_dict(row.get("ci"))
    return [_with_ci(row.get("auc"), ci.get("auc")), _with_ci(row.get("sensitivity"), ci.get("sensitivity")),
            _with_ci(row.get("specificity"), ci.get("specificity")), _num(row.get("brier"))]


def _slope(cal: Mapping[str, Any]) -> str:
    return _with_ci(cal.get("slope"), cal.get("slope_ci"))


def comparison_table(fam: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One line per family and validation (internal, external)."""
    header = ["family", "validation", "AUC (95% CI)", "sensitivity", "specificity", "Brier",
              "calibration slope (95% CI)"]
    rows = []
    internal = "internal (CV)" if fam.get("internal_validation") == "cv" else "internal"  # out-of-fold scores
    for name in fam.get("order", []):
        row = as_dict(as_dict(fam.get("rows")).get(name))
        mark = " (chosen)" if name == fam.get("chosen") else ""
        external = as_dict(row.get("external"))
        rows.append([name + mark, internal, *_cells(as_dict(row.get("internal"))),
                     _slope(as_dict(row.get("calibration")))])
        if external:
            rows.append([name + mark, "external (LOSO)", *_cells(external),
                         _slope(as_dict(external.get("calibration")))])
    return header, rows


def difference_rows(fam: Mapping[str, Any]) -> list[tuple[str, str, float, float, float, float]]:
    """(family, validation, AUC difference, CI low, CI high, p) vs the reference, finite ones only."""
    out = []
    comparison = as_dict(fam.get("comparison"))
    parts = (("internal", as_dict(as_dict(comparison.get("internal")).get("pairs"))),
             ("internal (CV)", as_dict(as_dict(comparison.get("cv")).get("pairs"))),
             ("external", as_dict(comparison.get("external"))))
    for part, pairs in parts:
        for name, pair in pairs.items():
            pair = as_dict(pair)
            ci = pair.get("auc_diff_ci") or [None, None]
            values = [finite_number(pair.get("auc_diff")), finite_number(ci[0]), finite_number(ci[1]),
                      finite_number(pair.get("p_value"))]
            if all(v is not None for v in values):
                out.append((name, part, *values))  # type: ignore[arg-type]
    return out


def _how(name: str) -> str:
    """A model's card line; a variant (model-covariates) says which inputs it took."""
    base, _, variant = name.partition(":")
    how = FAMILIES[base].fitted_by if base in FAMILIES else "unknown family"
    inputs = {"radiomics-only": "on the selected radiomics features only (no clinical inputs)",
              "clinical-only": "on the clinical inputs (model-covariates) only"}
    return f"{how}; {inputs[variant]}" if variant in inputs else how


def families_section(doc: dict[str, Any]) -> Section:
    fam = as_dict(doc.get("families"))
    if not fam:
        one = str(as_dict(doc.get("config")).get("models", "logistic-l2"))
        return Section("families", "Model families", [Text(f"This run fitted one model family ({one}); list several "
                                                           "in the run config's models to compare them here.")])
    chosen, rule = fam.get("chosen", "n/a"), str(fam.get("rule", ""))
    blocks: list[Block] = [Text(f"Chosen model: {chosen}, by {RULES.get(rule, rule)}; model.pt and the model card are "
                                "this family's. Every family was fitted on the same sites, harmonisation, "
                                "standardisation and selected features, and validated the same way.", "em")]
    header, rows = comparison_table(fam)
    blocks.append(Table(header, rows))
    blocks.append(Table(["family", "model card: how it was fitted and what its score is"],
                        [[n, _how(n)] for n in fam.get("order", [])]))
    diffs = difference_rows(fam)
    reference = str(fam.get("reference", ""))
    blocks.append(Table(["family", "validation", f"AUC difference to {reference} (95% CI)", "p"],
                        [[n, p, f"{d:+.3f} ({lo:+.3f} to {hi:+.3f})", f"{pv:.3g}"] for n, p, d, lo, hi, pv in diffs]))
    blocks.append(Text("Internal: paired DeLong covariance at each site over its held-out cases, sites pooled by "
                       "inverse variance; internal (CV): the same over every usable case's out-of-fold scores (each "
                       "from the fold model that did not train on it), per repeat, then the mean difference over the "
                       "repeats with the mean of their standard errors (repeats reuse the cases, so they are not "
                       "independent: a conservative interval); external: the same at each leave-one-site-out fold's "
                       "held-out site, folds pooled by inverse variance. Calibration slope: logistic recalibration "
                       "y ~ a + b logit(p) by Newton rounds on the sites' summed terms, internal over the held-out "
                       "cases, external at each fold's held-out site over all its cases, folds pooled by inverse "
                       "variance (Wald intervals). The svm's score is sigmoid(margin), not a calibrated probability: "
                       "its Brier score and calibration slope describe that score."))
    blocks.append(Figure(plots.forest_png, (diffs, reference), f"forest plot of AUC differences to {reference}",
                         f"AUC difference of each family to {reference}, internal (blue: held-out split or "
                         "cross-validated) and external (red), "
                         "with 95% intervals", md=f"(forest plot of AUC differences to {reference}: see report.html)",
                         fallback="the forest plot"))
    return Section("families", "Model families", blocks)

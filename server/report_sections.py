"""What each section of the human report says, built from a metrics.json document alone.

Each builder takes the document and returns a ``Section`` of blocks (``server.report_blocks``), once, for both
report.html and report.md. A section whose data is missing (older runs, refused or failed runs) says
"not available: <why>" instead, so a report can always be written. (Over 400 lines on purpose: the nine
sections of one report, read in the order the reader sees them; the model card is one of them.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server import plots
from server.report_blocks import (
    Block,
    Bullets,
    Facts,
    Figure,
    Heading,
    Section,
    Table,
    Text,
    as_dict,
    finite_number,
    md_code,
    unavailable,
)
from server.report_clinical import clinical_section
from server.report_validation import gain_sentence, local_only_blocks

SHOWN = ("auc", "sensitivity", "specificity", "balanced_accuracy")
SHOWN_LABELS = ("AUC", "sensitivity", "specificity", "balanced acc.")
HISTOGRAM_FEATURES = 4  # at most this many harmonisation figures
DEMO_STAMP = "demo.json"  # radfed.synth.STAMP_NAME: written by `radfed demo` at the root of its synthetic sites


# ---------------------------------------------------------------------------------------------- reading


def _final(doc: dict[str, Any]) -> dict[str, Any]:
    return as_dict(doc.get("final"))


def _final_sites(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(k): as_dict(v) for k, v in as_dict(_final(doc).get("sites")).items()}


def _rounds(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in doc.get("rounds") or [] if isinstance(r, dict)]


def short(text: Any, limit: int = 240) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _why_no_rounds(doc: dict[str, Any]) -> str:
    status, error = doc.get("status"), doc.get("error")
    because = f": {short(error)}" if error else ""
    if status == "refused":
        return f"the run was refused before training{because}"
    if status == "failed":
        return f"the run failed before a round was evaluated{because}"
    if status == "running":
        return "the run did not finish"
    return "this run recorded no evaluation round"


def _synthetic_data(doc: dict[str, Any]) -> str | None:
    """Why we know the sites were `radfed demo`'s synthetic hospitals, or None.

    Only when data-root holds the demo's stamp and every site of the run is one of the hospitals it lists:
    in a deployment the sites read their own folders, and data-root (default: the demo's) means nothing.
    """
    root = as_dict(doc.get("config")).get("data-root")
    sites = set(as_dict(doc.get("sites"))) | set(_final_sites(doc))
    if not root or not sites:
        return None
    try:
        stamp = json.loads((Path(str(root)).expanduser() / DEMO_STAMP).read_text(encoding="utf-8"))
        synthetic = {str(s["name"]) for s in stamp["sites"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not sites <= synthetic:
        return None
    return (f"the sites ({', '.join(sorted(sites))}) are the synthetic hospitals “radfed demo” generated in "
            f"data-root {root} ({DEMO_STAMP})")


# ---------------------------------------------------------------------------------------------- formatting


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _interval(ci: Any) -> str | None:
    """ "0.70–0.90" from [lo, hi]; None when there is no usable interval."""
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        return None
    lo, hi = finite_number(ci[0]), finite_number(ci[1])
    if lo is None or hi is None:
        return None
    return f"{lo:.2f}–{hi:.2f}"


def _fmt_ci(value: Any, ci: Any) -> str:
    """ "0.812 (0.70–0.90)"; just the value when there is no interval."""
    text = _fmt(value)
    interval = _interval(ci)
    return f"{text} ({interval})" if interval and value is not None else text


def _has_ci(records: list[dict[str, Any]]) -> bool:
    return any(_interval(as_dict(r.get("ci")).get(k)) for r in records for k in SHOWN)


def _metric_cells(record: dict[str, Any], with_ci: bool) -> list[str]:
    ci = as_dict(record.get("ci"))
    return [_fmt_ci(record.get(k), ci.get(k)) if with_ci else _fmt(record.get(k)) for k in SHOWN]


def _metric_header(with_ci: bool) -> list[str]:
    return [f"{h} (95% CI)" for h in SHOWN_LABELS] if with_ci else list(SHOWN_LABELS)


def final_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the final per-site table (last row: the federation), with 95% intervals as
    "0.812 (0.70–0.90)" when the metrics carry them."""
    sites = _final_sites(doc)
    agg = as_dict(_final(doc).get("aggregate"))
    with_ci = _has_ci([*sites.values(), agg])
    header = ["site", "held-out cases", *_metric_header(with_ci)]
    rows = [[name, _fmt(m.get("n")), *_metric_cells(m, with_ci)] for name, m in sorted(sites.items())]
    if agg:
        rows.append(["federation", _fmt(agg.get("n")), *_metric_cells(agg, with_ci)])
    return header, rows


def _summary_lines(doc: dict[str, Any]) -> list[tuple[str, str]]:
    prof = as_dict(doc.get("profile"))
    feats = as_dict(doc.get("features"))
    lines = [
        ("status", str(doc.get("status", "n/a")) + (f": {doc['error']}" if doc.get("error") else "")),
        ("run", str(doc.get("run_id", "n/a"))),
        ("profile", f"{prof.get('name', 'n/a')} v{prof.get('version', 'n/a')} ({str(prof.get('sha256', ''))[:12]})"),
        ("sites", ", ".join(sorted(as_dict(doc.get("sites")))) or "none"),
        ("rounds", str(len(_rounds(doc)))),
        ("features", f"{feats.get('n', 'n/a')} selected of {feats.get('agreed', 'n/a')} "
                     f"({feats.get('constant', 0)} near-constant, "
                     f"{feats.get('dropped_correlated', 0)} dropped as correlated"
                     + (f", {feats['dropped_l1']} by LASSO" if feats.get("dropped_l1") else "") + ")"),
        ("model sha256", str(doc.get("model_sha256"))),
        ("wall time", f"{finite_number(doc.get('seconds')) or 0.0:.1f} s"),
    ]
    drops = [d for d in doc.get("dropouts") or [] if isinstance(d, dict)]
    if drops:
        lines.append(("dropouts", "; ".join(_dropout(d) for d in drops)))
    gain = gain_sentence(doc)
    if gain:
        lines.insert(1, ("vs each hospital alone", gain))
    return lines


def _dropout(d: dict[str, Any]) -> str:
    where = f"round {d['round']} ({d.get('phase')})" if d.get("round") is not None else f"{d.get('phase')} phase"
    return f"{d.get('site')} at {where}: {short(d.get('reason', ''), 160)}"



SITE_COLUMNS = (("manifest", "n-hgg", "HGG"), ("manifest", "n-bm", "BM"), ("manifest", "n-problems", "unusable rows"),
                ("split", "n-cases", "usable"), ("split", "n-failed", "failed"),
                ("split", "n-train-hgg", "train HGG"), ("split", "n-train-bm", "train BM"),
                ("split", "n-test-hgg", "held-out HGG"), ("split", "n-test-bm", "held-out BM"))


def _site_data_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    sites = {str(k): as_dict(v) for k, v in as_dict(doc.get("sites")).items()}
    header = ["site", *(c[2] for c in SITE_COLUMNS)]
    rows, totals = [], [0] * len(SITE_COLUMNS)
    for name, s in sorted(sites.items()):
        row = [name]
        for i, (part, key, _) in enumerate(SITE_COLUMNS):
            value = as_dict(s.get(part)).get(key)
            row.append(_fmt(value))
            totals[i] += value if isinstance(value, int) else 0
        rows.append(row)
    if len(rows) > 1:
        rows.append(["all sites", *(str(t) for t in totals)])
    return header, rows


def _held_out_sizes(doc: dict[str, Any]) -> dict[str, int]:
    sizes = {}
    for name, s in as_dict(doc.get("sites")).items():
        split = as_dict(as_dict(s).get("split"))
        if isinstance(split.get("n-test-hgg"), int) and isinstance(split.get("n-test-bm"), int):
            sizes[str(name)] = split["n-test-hgg"] + split["n-test-bm"]
    for name, m in _final_sites(doc).items():
        if name not in sizes and isinstance(m.get("n"), int):
            sizes[name] = m["n"]
    return sizes


def _limitations(doc: dict[str, Any]) -> list[str]:
    cfg = as_dict(doc.get("config"))
    notes = as_dict(doc.get("notes"))
    k = cfg.get("min-cases-per-class", 5)
    out = []
    synthetic = _synthetic_data(doc)
    if synthetic:
        out.append(f"Synthetic demo data: {synthetic}. These images are generated, not patients; the numbers "
                   "here show that the pipeline works and say nothing about clinical performance.")
    sizes = _held_out_sizes(doc)
    if sizes:
        smallest = min(sizes, key=lambda s: sizes[s])
        out.append(f"Small samples: held-out sets of {min(sizes.values())}–{max(sizes.values())} cases per site "
                   f"({sum(sizes.values())} in all; smallest: {smallest}). One case moves a small site's "
                   "sensitivity or specificity by several points; read the 95% intervals, not the point values.")
    if len(sizes) and len(sizes) < 5:
        out.append(f"Few sites ({len(sizes)}): site-to-site variation, the thing that matters for a new hospital, "
                   "is poorly estimated from so few.")
    if str(cfg.get("harmonization", "")) == "combat":
        out.append("ComBat harmonisation was fitted on these sites' training splits only, and each site keeps its "
                   "own location/scale parameters. A new site or a new scanner has none: it must be fitted there "
                   "first, and the model's performance on it is unknown.")
    elif cfg.get("harmonization") is not None:
        out.append(f"No scanner harmonisation (harmonization = {cfg.get('harmonization')}): the features may carry "
                   "site and scanner effects the model has learnt.")
    threshold = notes.get("threshold", 0.5)
    out.append(f"The decision threshold is fixed at {threshold} and was not tuned; training weighted the classes "
               "to balance them, so it does not reflect any site's prevalence. Other operating points are on the "
               "ROC curves.")
    loso = as_dict(as_dict(doc.get("validation")).get("loso"))
    if loso:
        out.append(f"External validity is estimated only by leaving out one of these {len(loso)} sites at a time; "
                   "the held-out splits above are internal validation (same sites, scanners and period).")
    else:
        out.append("Internal validation only: the held-out cases come from the same sites, scanners and period as "
                   "the training cases; no site was kept out of training.")
    out.append("Two classes only (high-grade glioma vs brain metastasis): for any other lesion (low-grade glioma, "
               "lymphoma, abscess, ...) the model still outputs a probability, and it means nothing.")
    out.append("Radiomics depend on the segmentation masks the sites supplied; the federation checks their "
               "geometry and labels, not whether they are right.")
    out.append(f"The federation AUC is a case-weighted mean of site AUCs, not the AUC of pooled predictions. "
               f"ROC and calibration points are coarse: each step covers at least k = {k} cases.")
    if doc.get("dropouts"):
        out.append("Some sites left the run (see dropouts in the summary): the results cover only those that "
                   "stayed.")
    return out


def _training_text(doc: dict[str, Any]) -> str:
    cfg = as_dict(doc.get("config"))
    done = len(_rounds(doc))
    if str(cfg.get("training", "fedavg")) == "exact":
        return (f"exact federated logistic regression: Newton steps on the sites' summed gradients and Hessians "
                f"(the pooled maximum-likelihood fit, L2 {cfg.get('exact-l2', 'n/a')}, L1 {cfg.get('exact-l1', 0)}); "
                f"{done} step(s) of at most {cfg.get('exact-max-rounds', 'n/a')}; only aggregates left the sites")
    return (f"federated averaging: {done} of {cfg.get('num-server-rounds', 'n/a')} rounds completed, "
            f"{cfg.get('local-epochs', 'n/a')} local epochs, learning rate {cfg.get('learning-rate', 'n/a')}, "
            f"weight decay {cfg.get('weight-decay', 'n/a')}; only aggregates left the sites")


def _privacy_text(cfg: dict[str, Any], privacy: dict[str, Any] | None = None) -> str:
    text = f"every statistic a site sent covers at least k = {cfg.get('min-cases-per-class', 5)} cases; "
    noise = finite_number(cfg.get("dp-noise-multiplier"))
    query = finite_number(cfg.get("dp-query-noise-multiplier"))
    parts = []
    if query:
        spent = as_dict(as_dict(privacy).get("query"))
        eps = finite_number(spent.get("epsilon"))
        parts.append(f"moments, correlation and Newton sums clipped at {cfg.get('dp-query-clip', 'n/a')} "
                     f"(standardised) with Gaussian noise (noise multiplier {query:g}) at each site"
                     + (f", epsilon {eps:.3g} at delta {cfg.get('dp-delta', 'n/a')} for the most-asked site "
                        "(one case added or removed)" if eps is not None else "")
                     + "; histograms withheld; ComBat sums and evaluations are not noised")
    if noise:
        parts.append(f"model updates clipped to L2 norm {cfg.get('dp-clip-norm', 'n/a')} with Gaussian noise "
                     f"(noise multiplier {noise:g}) at each site")
    if parts:
        return text + "; ".join(parts) + "; no secure aggregation"
    return text + "no differential privacy or secure aggregation"



# ---------------------------------------------------------------------------------------------- sections


def _na(why: str) -> Section:
    """A section that cannot be shown: it says why (the caller's id and title are filled in)."""
    return Section("", "", [unavailable(why)])


def _summary(doc: dict[str, Any]) -> Section:
    return Section("summary", "Summary", [Facts(_summary_lines(doc))])


def _harmonisation_text(cfg: dict[str, Any]) -> str:
    harmonisation = str(cfg.get("harmonization", "n/a"))
    if harmonisation != "combat":
        return harmonisation
    return ("distributed ComBat (" + ("parametric" if cfg.get("combat-parametric", True) else "non-parametric")
            + (", empirical Bayes" if cfg.get("combat-eb", True) else "")
            + (", location only" if cfg.get("combat-mean-only") else "") + "), site as batch, "
            + (f"adjusting for {cfg['combat-covariates']}" if cfg.get("combat-covariates") else "no covariates"))


INTENDED_USE = ("Research on federated radiomics methods: comparing sites, harmonisation and training set-ups on "
                "retrospective data. Not a diagnostic device; not validated for, and must not be used in, decisions "
                "about individual patients.")


def _model_card(doc: dict[str, Any]) -> Section:
    cfg = as_dict(doc.get("config"))
    prof = as_dict(doc.get("profile"))
    feats = as_dict(doc.get("features"))
    notes = as_dict(doc.get("notes"))
    lasso = f", then LASSO with select-l1 = {cfg['select-l1']}" if finite_number(cfg.get("select-l1")) else ""
    facts = [
        ("task", "high-grade glioma (HGG) vs brain metastasis (BM) from MRI radiomics; positive class "
                 f"{notes.get('positive_class', 'HGG')}"),
        ("model", "logistic regression on the selected features, standardised with the pooled training "
                  "means and standard deviations"),
        ("training", _training_text(doc)),
        ("extraction profile", f"{prof.get('name', 'n/a')} version {prof.get('version', 'n/a')}, "
                               f"sha256 {prof.get('sha256', 'n/a')}"),
        ("features", f"{feats.get('n', 'n/a')} selected (Welch's t, decorrelated at "
                     f"{cfg.get('select-max-correlation', 'n/a')}{lasso}) of {feats.get('agreed', 'n/a')} agreed "
                     f"by all sites; list sha256 {feats.get('sha256', 'n/a')}"),
        ("harmonisation", _harmonisation_text(cfg)),
        ("decision threshold", f"{notes.get('threshold', 0.5)} on the predicted probability of HGG"),
        ("evaluation", f"held-out split per site (test fraction {cfg.get('test-fraction', 'n/a')}, split seed "
                       f"{cfg.get('split-seed', 'n/a')}), never used for training, selection or harmonisation fits"
                       + ("; leave-one-site-out external validation"
                          if as_dict(as_dict(doc.get("validation")).get("loso")) else "")),
        ("privacy", _privacy_text(cfg, as_dict(doc.get("privacy")))),
        ("model sha256", str(doc.get("model_sha256"))),
    ]
    blocks: list[Block] = []
    if not doc.get("model_sha256"):
        why = _why_no_rounds(doc) if not _rounds(doc) else f"the run ended {doc.get('status', 'early')}"
        blocks.append(Text(f"No model was produced ({why}); this card describes the configured set-up.", "na"))
    header, rows = _site_data_table(doc)
    blocks += [Facts(facts), Heading("Intended use"), Text(INTENDED_USE), Heading("Data per site (cases)"),
               Table(header, rows) if rows else unavailable(
                   "no site reported its case counts" + (f" ({_why_no_rounds(doc)})" if not _rounds(doc) else "")),
               Heading("Limitations"), Bullets(_limitations(doc))]
    return Section("model-card", "Model card", blocks)


def _final_section(doc: dict[str, Any]) -> Section:
    if not _final_sites(doc):
        return _na(_why_no_rounds(doc))
    header, rows = final_table(doc)
    notes = as_dict(doc.get("notes"))
    if _has_ci([*_final_sites(doc).values(), as_dict(_final(doc).get("aggregate"))]):
        text = ("95% intervals: AUC from its DeLong variance (normal approximation), sensitivity and specificity "
                "Wilson, balanced accuracy normal approximation.")
    else:
        text = "95% intervals: not available (this run's metrics carry none; runs before intervals were added)."
    blocks: list[Block] = [Table(header, rows), Text(text)]
    if notes.get("internal_validation"):
        blocks.insert(0, Text(f"Internal validation: {notes['internal_validation']}."))
    if notes.get("aggregate"):
        blocks.append(Text(f"Federation row: {notes['aggregate']}.", "em"))
    final_round = _final(doc).get("round")
    what = "Out-of-fold" if as_dict(doc.get("config")).get("internal-validation") == "cv" else "Final held-out"
    return Section("final", f"{what} metrics (round {final_round}, threshold {notes.get('threshold', 0.5)}, "
                            f"{notes.get('positive_class', 'HGG')} positive)", blocks)


def _curves_of(records: dict[str, dict[str, Any]], key: str) -> tuple[dict[str, Any], list[str]]:
    have = {name: r[key] for name, r in records.items() if isinstance(r.get(key), dict)}
    return have, sorted(set(records) - set(have))


def _not_sent(missing: list[str], what: str) -> list[Block]:
    return [Text(f"not available for {', '.join(missing)}: no {what} sent", "na", tight=True)] if missing else []


def _roc_section(doc: dict[str, Any]) -> Section:
    sites = _final_sites(doc)
    if not sites:
        return _na(_why_no_rounds(doc))
    curves, missing = _curves_of(sites, "roc")
    if not curves:
        return _na("the sites sent no ROC points (runs before curves were reported)")
    caption = ("Each point is an operating threshold; every step between points covers at least k held-out cases, "
               "so the curves are coarse on purpose.")
    figure = Figure(plots.roc_png, (curves, "held-out ROC per site (final model)",
                                    {n: sites[n].get("auc") for n in curves}), alt="ROC curves per site",
                    caption=caption, md=f"ROC curves of {len(curves)} site(s): figure in report.html.")
    return Section("roc", "ROC curves (held-out, final model)", [figure, *_not_sent(missing, "ROC points")])


def _calibration_section(doc: dict[str, Any]) -> Section:
    sites = _final_sites(doc)
    if not sites:
        return _na(_why_no_rounds(doc))
    bins, missing = _curves_of(sites, "calibration")
    if not bins:
        return _na("the sites sent no calibration bins (runs before curves were reported)")
    caption = ("Mean predicted probability of HGG against the observed HGG rate, per bin of at least k held-out "
               "cases (marker area: cases). Points on the diagonal are well calibrated.")
    figure = Figure(plots.calibration_png, (bins, "reliability diagram (held-out, final model)"),
                    alt="calibration per site", caption=caption)
    rows = []
    for name in sorted(bins):
        b = bins[name]
        for i, (p, o, n) in enumerate(zip(b.get("predicted") or [], b.get("observed") or [], b.get("n") or [],
                                          strict=False), start=1):
            rows.append([name, str(i), _fmt(finite_number(p)), _fmt(finite_number(o)), _fmt(n)])
    table = Table(["site", "bin", "mean predicted", "observed HGG rate", "cases"], rows, only="md")
    return Section("calibration", "Calibration (held-out, final model)",
                   [figure, table, *_not_sent(missing, "calibration bins")])


def _training_section(doc: dict[str, Any]) -> Section:
    rounds = _rounds(doc)
    if not rounds:
        return _na(_why_no_rounds(doc))
    loss: dict[str, list[tuple[Any, Any]]] = {}
    auc: dict[str, list[tuple[Any, Any]]] = {}
    fed = []
    for rnd in rounds:
        r = rnd.get("round")
        for name, m in as_dict(as_dict(rnd.get("train")).get("sites")).items():
            loss.setdefault(str(name), []).append((r, finite_number(as_dict(m).get("loss"))))
        ev = as_dict(rnd.get("evaluate"))
        for name, m in as_dict(ev.get("sites")).items():
            auc.setdefault(str(name), []).append((r, finite_number(as_dict(m).get("auc"))))
        fed.append((r, finite_number(as_dict(ev.get("aggregate")).get("auc"))))
    sites = sorted(set(auc) | set(_final_sites(doc)))
    rows = []
    for rnd in rounds:
        ev = as_dict(rnd.get("evaluate"))
        if not as_dict(ev.get("sites")):
            continue  # trained, not evaluated (an exact fit's Newton steps)
        rows.append([_fmt(rnd.get("round")), _fmt(as_dict(ev.get("aggregate")).get("auc")),
                     *(_fmt(as_dict(as_dict(ev.get("sites")).get(s)).get("auc")) for s in sites)])
    caption = ("Left: each site's mean training loss over its local epochs. Right: held-out AUC per site after each "
               "round, and the federation's (case-weighted mean of site AUCs).")
    return Section("training", "Training curves per round", [
        Figure(plots.training_png, (loss, auc, fed), alt="training loss and held-out AUC per round", caption=caption),
        Text("Held-out AUC per round:", only="md"),
        Table(["round", "federation", *sites], rows, fold="held-out AUC per round (table)")])


def _harmonization_section(doc: dict[str, Any]) -> Section:
    cfg = as_dict(doc.get("config"))
    features = as_dict(as_dict(doc.get("harmonization")).get("features"))
    if not features:
        if str(cfg.get("harmonization", "")) == "none":
            return _na('harmonisation was off in this run (harmonization = "none")')
        if finite_number(cfg.get("dp-query-noise-multiplier")):
            return _na("withheld: the query phases were noised (dp-query-noise-multiplier), and per-bin counts of "
                       "single features have no useful noised form at these sizes")
        if not _rounds(doc):
            return _na(_why_no_rounds(doc))
        return _na("this run's metrics carry no before/after histograms (runs before they were reported)")
    shown = list(features)[:HISTOGRAM_FEATURES]
    blocks: list[Block] = [Text("Distributions of model features per site before and after harmonisation, aggregated "
                                "at each site: every bin count is 0 or at least k cases (neighbouring bins merged "
                                "where needed), so steps can be uneven. Densities are per site, so sites of "
                                "different sizes compare.", only="html")]
    for name in shown:
        f = as_dict(features[name])
        blocks.append(Figure(plots.harmonization_png, (name, f.get("edges") or [], as_dict(f.get("sites"))),
                             alt=f"{name} before and after harmonisation", caption=name, fallback=name, tight=True,
                             md=f"- {md_code(name)}: {len(as_dict(f.get('sites')))} site(s), figure in report.html"))
    if len(features) > len(shown):
        blocks.append(Text(f"showing {len(shown)} of {len(features)} features", "item", tight=True))
    return Section("harmonization", "Harmonisation before/after", blocks)


def _features_section(doc: dict[str, Any]) -> Section:
    selected = as_dict(as_dict(doc.get("features")).get("selected"))
    if not selected:
        return _na(_why_no_rounds(doc) if not _rounds(doc) else "no selected features recorded")
    rows = [[str(n), f"{t:+.2f}" if finite_number(t) is not None else "n/a"] for n, t in selected.items()]
    return Section("features", "Selected features (Welch's t, HGG vs BM, pooled training data)",
                   [Table(["feature", "t"], rows, code_first=True)])


def _loso_blocks(loso: dict[str, dict[str, Any]]) -> list[Block]:
    ok = [r for r in loso.values() if "error" not in r]
    with_ci = _has_ci(ok)
    rows = []
    for name, r in sorted(loso.items()):
        trained = ", ".join(str(s) for s in r.get("trained_on") or []) or "the other sites"
        if "error" in r:
            rows.append([name, trained, "n/a", f"failed: {short(r['error'], 160)}", *([""] * (len(SHOWN) - 1))])
        else:
            rows.append([name, trained, _fmt(r.get("n")), *_metric_cells(r, with_ci)])
    blocks: list[Block] = [
        Text("Each row: a model trained from scratch by the other sites (feature agreement, ComBat, moments, feature "
             "selection and training redone without the held-out site), scored on all of the held-out site's "
             "usable cases after that site harmonised itself against the fold's ComBat estimates, as a "
             "late-joining hospital does. Nothing learned from the held-out site enters its fold."),
        Table(["held-out site", "trained on", "cases", *_metric_header(with_ci)], rows)]
    curves, _ = _curves_of(loso, "roc")
    if curves:
        blocks.append(Figure(plots.roc_png, (curves, "leave-one-site-out ROC (each site unseen in training)",
                                             {n: loso[n].get("auc") for n in curves}),
                             alt="leave-one-site-out ROC curves", caption="ROC at each site of the model trained "
                             "without it.", md=f"Leave-one-site-out ROC curves of {len(curves)} site(s): figure in "
                             "report.html."))
    else:
        blocks.append(unavailable("no leave-one-site-out ROC points"))
    return blocks


def _baseline_blocks(baselines: dict[str, Any]) -> list[Block]:
    keys = [k for k in SHOWN if any(k in as_dict(b) for b in baselines.values())]
    keys += sorted({k for b in baselines.values() for k in as_dict(b)} - set(keys) - {"ci"})
    with_ci = _has_ci([as_dict(b) for b in baselines.values()])
    labels = dict(zip(SHOWN, _metric_header(with_ci), strict=True))
    rows = []
    for name, b in sorted(baselines.items()):
        if not isinstance(b, dict):
            rows.append([str(name), short(b, 160), *([""] * (len(keys) - 1))])
            continue
        ci = as_dict(b.get("ci"))
        rows.append([str(name), *(_fmt_ci(b.get(k), ci.get(k)) if k in SHOWN else short(_fmt(b.get(k)), 160)
                                  for k in keys)])
    return [Heading("Baselines"), Table(["baseline", *(labels.get(k, k) for k in keys)], rows)]


def _validation_section(doc: dict[str, Any]) -> Section:
    validation = as_dict(doc.get("validation"))
    loso = {str(k): as_dict(v) for k, v in as_dict(validation.get("loso")).items()}
    baselines = as_dict(validation.get("baselines"))
    local = local_only_blocks(doc)
    if not loso and not baselines and not local:
        if not _rounds(doc) and doc.get("status") != "completed":
            return _na(_why_no_rounds(doc))
        return _na("leave-one-site-out validation was not run")
    blocks = (_loso_blocks(loso) if loso else []) + local + (_baseline_blocks(baselines) if baselines else [])
    if validation.get("note"):
        blocks.append(Text(str(validation["note"])))
    return Section("validation", "External validation (leave-one-site-out)", blocks)


SECTIONS: list[tuple[str, str, Callable[[dict[str, Any]], Section]]] = [
    ("summary", "Summary", _summary),
    ("model-card", "Model card", _model_card),
    ("final", "Final held-out metrics", _final_section),
    ("roc", "ROC curves (held-out, final model)", _roc_section),
    ("calibration", "Calibration (held-out, final model)", _calibration_section),
    ("clinical", "Clinical metrics (pooled held-out cases, final model)", clinical_section),
    ("training", "Training curves per round", _training_section),
    ("harmonization", "Harmonisation before/after", _harmonization_section),
    ("features", "Selected features", _features_section),
    ("validation", "External validation (leave-one-site-out)", _validation_section),
]


def all_site_names(doc: dict[str, Any]) -> set[str]:
    """Every site the document names anywhere (for one colour per site across all figures)."""
    names = set(as_dict(doc.get("sites"))) | set(_final_sites(doc))
    for rnd in _rounds(doc):
        names |= set(as_dict(as_dict(rnd.get("evaluate")).get("sites")))
        names |= set(as_dict(as_dict(rnd.get("train")).get("sites")))
    names |= set(as_dict(as_dict(doc.get("validation")).get("loso")))
    for f in as_dict(as_dict(doc.get("harmonization")).get("features")).values():
        names |= set(as_dict(as_dict(f).get("sites")))
    return {str(n) for n in names}

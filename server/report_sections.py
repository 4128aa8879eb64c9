"""What each section of the human report says, built from a metrics.json document alone.

Each builder takes the document and returns a ``Section`` of blocks (``server.report_blocks``), once, for both
report.html and report.md. A section whose data is missing (older runs, refused or failed runs) says
"not available: <why>" instead, so a report can always be written. ``SECTIONS`` is the order the reader sees;
the first screen (``report_headline``), the curves (``report_curves``), the clinical metrics
(``report_clinical``) and external validation (``report_validation``) are built in their own modules.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import families
from common.explain import feature_words
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
    final_of,
    final_sites,
    finite_number,
    fmt,
    has_ci,
    metric_cells,
    metric_header,
    not_available,
    rounds_of,
    unavailable,
    why_no_rounds,
)
from server.report_clinical import clinical_section
from server.report_curves import calibration_section, roc_section
from server.report_families import families_section
from server.report_harmonization import harmonization_section
from server.report_headline import headline_section
from server.report_robustness import robustness_section
from server.report_validation import validation_section

DEMO_STAMP = "demo.json"  # radfed.synth.STAMP_NAME: written by `radfed demo` at the root of its synthetic sites


# ---------------------------------------------------------------------------------------------- reading


def _synthetic_data(doc: dict[str, Any]) -> str | None:
    """Why we know the sites were `radfed demo`'s synthetic hospitals, or None.

    Only when data-root holds the demo's stamp and every site of the run is one of the hospitals it lists:
    in a deployment the sites read their own folders, and data-root (default: the demo's) means nothing.
    """
    root = as_dict(doc.get("config")).get("data-root")
    sites = set(as_dict(doc.get("sites"))) | set(final_sites(doc))
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


def final_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the final per-site table (last row: the federation), with 95% intervals as
    "0.812 (0.70–0.90)" when the metrics carry them."""
    sites = final_sites(doc)
    agg = as_dict(final_of(doc).get("aggregate"))
    with_ci = has_ci([*sites.values(), agg])
    header = ["site", "held-out cases", *metric_header(with_ci)]
    rows = [[name, fmt(m.get("n")), *metric_cells(m, with_ci)] for name, m in sorted(sites.items())]
    if agg:
        rows.append(["federation", fmt(agg.get("n")), *metric_cells(agg, with_ci)])
    return header, rows


def _summary_lines(doc: dict[str, Any]) -> list[tuple[str, str]]:
    prof = as_dict(doc.get("profile"))
    feats = as_dict(doc.get("features"))
    lines = [
        ("status", str(doc.get("status", "n/a")) + (f": {doc['error']}" if doc.get("error") else "")),
        ("run", str(doc.get("run_id", "n/a"))),
        ("profile", f"{prof.get('name', 'n/a')} v{prof.get('version', 'n/a')} ({str(prof.get('sha256', ''))[:12]})"),
        ("sites", ", ".join(sorted(as_dict(doc.get("sites")))) or "none"),
        ("rounds", str(len(rounds_of(doc)))),
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
    return lines  # the result itself (unseen sites, gain, internal) is on the first screen: report_headline


def _dropout(d: dict[str, Any]) -> str:
    where = f"round {d['round']} ({d.get('phase')})" if d.get("round") is not None else f"{d.get('phase')} phase"
    return f"{d.get('site')} at {where}: {d.get('reason', '')}"



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
            row.append(fmt(value))
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
    for name, m in final_sites(doc).items():
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
    if as_dict(final_of(doc).get("pooled")):
        out.append("The federation row's AUC is a case-weighted mean of site AUCs; the pooled AUC of all held-out "
                   "cases (clinical section) comes from coarse score counts and is known only within a range. "
                   f"ROC and calibration points are coarse: each step covers at least k = {k} cases.")
    else:
        out.append(f"The federation AUC is a case-weighted mean of site AUCs, not the AUC of pooled predictions. "
                   f"ROC and calibration points are coarse: each step covers at least k = {k} cases.")
    if doc.get("dropouts"):
        out.append("Some sites left the run (see dropouts in the summary): the results cover only those that "
                   "stayed.")
    return out


def _training_text(doc: dict[str, Any]) -> str:
    cfg = as_dict(doc.get("config"))
    done = len(rounds_of(doc))
    if str(cfg.get("training", "fedavg")) == "exact":
        return (f"exact federated logistic regression: Newton steps on the sites' summed gradients and Hessians "
                f"(the pooled maximum-likelihood fit, L2 {cfg.get('exact-l2', 'n/a')}, L1 {cfg.get('exact-l1', 0)}); "
                f"{done} step(s) of at most {cfg.get('exact-max-rounds', 'n/a')}; only aggregates left the sites")
    if str(cfg.get("models", "")).split(",")[0].strip() == "gbt":
        return (f"gradient-boosted trees grown from k-anonymous histograms: {cfg.get('tree-rounds', 'n/a')} trees of "
                f"depth {cfg.get('tree-depth', 'n/a')}, thresholds only at {cfg.get('tree-bins', 'n/a')} agreed bins, "
                f"learning rate {cfg.get('tree-learning-rate', 'n/a')}, L2 {cfg.get('tree-l2', 'n/a')}; {done} round "
                "trip(s), one per tree level; each site's release blocks were routed whole, so every node and bin it "
                "sent covers whole blocks; only aggregates left the sites")
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
        ("model", _model_text(doc)),
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
        why = why_no_rounds(doc) if not rounds_of(doc) else f"the run ended {doc.get('status', 'early')}"
        blocks.append(Text(f"No model was produced ({why}); this card describes the configured set-up.", "na"))
    header, rows = _site_data_table(doc)
    blocks += [Facts(facts), Heading("Intended use"), Text(INTENDED_USE), Heading("Data per site (cases)"),
               Table(header, rows) if rows else unavailable(
                   "no site reported its case counts" + (f" ({why_no_rounds(doc)})" if not rounds_of(doc) else "")),
               Heading("Limitations"), Bullets(_limitations(doc))]
    return Section("model-card", "Model card", blocks)


def _model_text(doc: dict[str, Any]) -> str:
    """The model card's model line: the chosen family (the only one in a one-family run) and how it was fitted."""
    cfg = as_dict(doc.get("config"))
    family = str(as_dict(doc.get("families")).get("chosen") or str(cfg.get("models", "logistic-l2")).split(",")[0])
    how = families.FAMILIES[family].fitted_by if family in families.FAMILIES else "unknown family"
    return (f"{family}: {how}; on the selected features, standardised with the pooled training means and standard "
            "deviations")


def _final_section(doc: dict[str, Any]) -> Section:
    if not final_sites(doc):
        return not_available(why_no_rounds(doc))
    header, rows = final_table(doc)
    notes = as_dict(doc.get("notes"))
    if has_ci([*final_sites(doc).values(), as_dict(final_of(doc).get("aggregate"))]):
        text = ("95% intervals: AUC from its DeLong variance (normal approximation), sensitivity and specificity "
                "Wilson, balanced accuracy normal approximation.")
    else:
        text = "95% intervals: not available (this run's metrics carry none; runs before intervals were added)."
    blocks: list[Block] = [Table(header, rows), Text(text)]
    if notes.get("internal_validation"):
        blocks.insert(0, Text(f"Internal validation: {notes['internal_validation']}."))
    if notes.get("aggregate"):
        blocks.append(Text(f"Federation row: {notes['aggregate']}.", "em"))
    final_round = final_of(doc).get("round")
    what = "Out-of-fold" if as_dict(doc.get("config")).get("internal-validation") == "cv" else "Final held-out"
    return Section("final", f"{what} metrics (round {final_round}, threshold {notes.get('threshold', 0.5)}, "
                            f"{notes.get('positive_class', 'HGG')} positive)", blocks)


def _training_section(doc: dict[str, Any]) -> Section:
    rounds = rounds_of(doc)
    if not rounds:
        return not_available(why_no_rounds(doc))
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
        if as_dict(ev.get("sites")):  # evaluated rounds only: the last, and every evaluate-every-th when set
            fed.append((r, finite_number(as_dict(ev.get("aggregate")).get("auc"))))
    sites = sorted(set(auc) | set(final_sites(doc)))
    rows = []
    for rnd in rounds:
        ev = as_dict(rnd.get("evaluate"))
        if not as_dict(ev.get("sites")):
            continue  # trained, not evaluated (an exact fit's Newton steps)
        rows.append([fmt(rnd.get("round")), fmt(as_dict(ev.get("aggregate")).get("auc")),
                     *(fmt(as_dict(as_dict(ev.get("sites")).get(s)).get("auc")) for s in sites)])
    caption = ("Left: each site's mean training loss over its local epochs. Right: held-out AUC per site after each "
               "evaluated round (the last; also every evaluate-every-th round when that knob is set), and the "
               "federation's (case-weighted mean of site AUCs).")
    return Section("training", "Training curves per round", [
        Figure(plots.training_png, (loss, auc, fed), alt="training loss and held-out AUC per round", caption=caption),
        Text("Held-out AUC per round:", only="md"),
        Table(["round", "federation", *sites], rows, fold="held-out AUC per round (table)")])


def _features_section(doc: dict[str, Any]) -> Section:
    feats = as_dict(doc.get("features"))
    selected, weights = as_dict(feats.get("selected")), as_dict(feats.get("weights"))
    if not selected:
        return not_available(why_no_rounds(doc) if not rounds_of(doc) else "no selected features recorded")

    def t_text(name: str) -> str:
        t = finite_number(selected.get(name))
        return f"{t:+.2f}" if t is not None else "n/a"

    if not weights:  # runs before the weights were recorded: the ranking by t only
        rows = [[feature_words(str(n)), str(n), t_text(n)] for n in selected]
        return Section("features", "Selected features (Welch's t, HGG vs BM, pooled training data)",
                       [Table(["feature", "identifier", "t"], rows)])
    order = sorted(selected, key=lambda n: -abs(finite_number(weights.get(n)) or 0.0))
    rows = []
    for name in order:
        w = finite_number(weights.get(name))
        towards = "n/a" if w is None else "HGG" if w > 0 else "BM" if w < 0 else "neither"
        rows.append([feature_words(str(name)), f"{w:+.3f}" if w is not None else "n/a", towards, t_text(name),
                     str(name)])
    text = Text("The model's weight per standard deviation of each feature (its inputs are standardised with the "
                "pooled training means and standard deviations): a higher value of a feature with a positive weight "
                "moves a case towards HGG. Largest weights first; t is Welch's t of the feature between HGG and BM "
                "in the pooled training data, the ranking that selected it.")
    return Section("features", "Selected features (model weights, HGG vs BM)",
                   [text, Table(["feature", "weight per SD", "higher value points to", "t", "identifier"], rows)])


SECTIONS: list[tuple[str, str, Callable[[dict[str, Any]], Section]]] = [
    ("headline", "Result", headline_section),
    ("summary", "Summary", _summary),
    ("model-card", "Model card", _model_card),
    ("final", "Final held-out metrics", _final_section),
    ("roc", "ROC curves (held-out, final model)", roc_section),
    ("calibration", "Calibration (held-out, final model)", calibration_section),
    ("clinical", "Clinical metrics (pooled held-out cases, final model)", clinical_section),
    ("training", "Training curves per round", _training_section),
    ("harmonization", "Harmonisation before/after", harmonization_section),
    ("robustness", "Feature robustness (ICC under perturbations)", robustness_section),
    ("features", "Selected features", _features_section),
    ("validation", "External validation (leave-one-site-out)", validation_section),
    ("families", "Model families", families_section),
]


def all_site_names(doc: dict[str, Any]) -> set[str]:
    """Every site the document names anywhere (for one colour per site across all figures)."""
    names = set(as_dict(doc.get("sites"))) | set(final_sites(doc))
    for rnd in rounds_of(doc):
        names |= set(as_dict(as_dict(rnd.get("evaluate")).get("sites")))
        names |= set(as_dict(as_dict(rnd.get("train")).get("sites")))
    names |= set(as_dict(as_dict(doc.get("validation")).get("loso")))
    for f in as_dict(as_dict(doc.get("harmonization")).get("features")).values():
        names |= set(as_dict(as_dict(f).get("sites")))
    return {str(n) for n in names}

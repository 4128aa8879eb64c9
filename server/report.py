"""A run's outputs: metrics.json (machines), report.html and report.md (people).

report.html is one self-contained file: its figures are PNGs drawn by ``server.plots`` and embedded as
base64 data URIs, its style is inline, and a Content-Security-Policy forbids loading anything else.
Every section is built from the metrics document alone and says "not available: <why>" when its data
is missing (older runs, refused or failed runs), so a report can always be written.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import metrics
from common.canon import json_safe
from common.profile import Profile
from server import plots

log = logging.getLogger("flwr.radfed.server")

METRICS_SCHEMA = "radfed.metrics/1"
SHOWN = ("auc", "sensitivity", "specificity", "balanced_accuracy")
SHOWN_LABELS = ("AUC", "sensitivity", "specificity", "balanced acc.")
HISTOGRAM_FEATURES = 4  # at most this many harmonisation figures
DEMO_STAMP = "demo.json"  # radfed.synth.STAMP_NAME: written by `radfed demo` at the root of its synthetic sites


@dataclass
class RunResult:
    run_id: int
    folder: Path
    config: dict[str, Any]
    profile: Profile
    status: str = "running"
    error: str = ""
    seconds: float = 0.0
    site_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    split_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    dropouts: list[dict[str, Any]] = field(default_factory=list)
    features: dict[str, Any] = field(default_factory=dict)
    training: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    evaluations: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    model_sha256: str | None = None
    # Optional (absent from metrics.json when empty):
    # curves[round][site] = {"roc": {"fpr", "tpr"}, "calibration": {"predicted", "observed", "n"}};
    # the last evaluated round's go into final.sites.
    curves: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # {"features": {name: {"edges": [...], "sites": {site: {"before": [...], "after": [...]}}}}}
    harmonization: dict[str, Any] | None = None
    # {"loso": {site: {n, auc, sensitivity, ..., "ci", "roc", ...} or {"error"}}, "baselines": {...}}
    validation: dict[str, Any] | None = None

    def rounds(self) -> list[dict[str, Any]]:
        """Every round that trained or evaluated; a round without evaluation (e.g. an exact-fit Newton step)
        has ``evaluate = {"sites": {}, "aggregate": None}``."""
        out = []
        for r in sorted(set(self.training) | set(self.evaluations)):
            sites = self.evaluations.get(r, {})
            out.append({"round": r, "train": {"sites": self.training.get(r, {})},
                        "evaluate": {"sites": sites,
                                     "aggregate": metrics.combine_sites(list(sites.values())) if sites else None}})
        return out

    def final_aggregate(self) -> dict[str, float] | None:
        if not self.evaluations:
            return None
        return metrics.combine_sites(list(self.evaluations[max(self.evaluations)].values()))

    def final_sites(self) -> dict[str, dict[str, Any]]:
        """The last round's site records, with that round's curves and 95% intervals where available."""
        if not self.evaluations:
            return {}
        last = max(self.evaluations)
        curves = self.curves.get(last, {})
        out = {}
        for name, record in self.evaluations[last].items():
            site = {**record, **curves.get(name, {})}
            if "ci" not in site and "auc_var" in site:
                site["ci"] = _intervals(site)
            out[name] = site
        return out

    def as_json(self) -> dict[str, Any]:
        aggregate = self.final_aggregate()
        if aggregate is not None and "auc_var" in aggregate:
            aggregate["ci"] = _intervals(aggregate)
        doc = {
            "schema": METRICS_SCHEMA,
            "run_id": self.run_id,
            "status": self.status,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "profile": {"name": self.profile.name, "version": self.profile.version, "sha256": self.profile.sha256},
            "config": self.config,
            "sites": {name: {"manifest": self.site_counts.get(name, {}), "split": self.split_counts.get(name, {})}
                      for name in sorted(set(self.site_counts) | set(self.split_counts))},
            "dropouts": self.dropouts,
            "features": self.features,
            "model_sha256": self.model_sha256,
            "rounds": self.rounds(),
            "final": {"round": max(self.evaluations) if self.evaluations else None, "sites": self.final_sites(),
                      "aggregate": aggregate},
            "notes": {
                "aggregate": "sensitivity, specificity and balanced accuracy from confusion counts summed over "
                             "sites; AUC is the mean of site AUCs weighted by held-out cases",
                "positive_class": "HGG",
                "threshold": 0.5,
            },
        }
        if self.harmonization:
            doc["harmonization"] = self.harmonization
        if self.validation:
            doc["validation"] = self.validation
        return json_safe(doc)


def _intervals(record: dict[str, Any]) -> dict[str, list[float]] | None:
    """95% intervals of a site or federation record; None rather than an exception (the outputs must be written)."""
    try:
        return metrics.intervals(record)
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("no 95%% intervals for %s: %s", record, exc)
        return None


def write_outputs(result: RunResult) -> None:
    doc = result.as_json()
    (result.folder / "metrics.json").write_text(json.dumps(doc, indent=2, allow_nan=False), encoding="utf-8")
    (result.folder / "report.md").write_text(render_markdown(doc), encoding="utf-8")
    (result.folder / "report.html").write_text(render_html(doc), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- reading


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _final(doc: dict[str, Any]) -> dict[str, Any]:
    return _dict(doc.get("final"))


def _final_sites(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(k): _dict(v) for k, v in _dict(_final(doc).get("sites")).items()}


def _rounds(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in doc.get("rounds") or [] if isinstance(r, dict)]


def _short(text: Any, limit: int = 240) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _why_no_rounds(doc: dict[str, Any]) -> str:
    status, error = doc.get("status"), doc.get("error")
    because = f": {_short(error)}" if error else ""
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
    root = _dict(doc.get("config")).get("data-root")
    sites = set(_dict(doc.get("sites"))) | set(_final_sites(doc))
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
    lo, hi = _number(ci[0]), _number(ci[1])
    if lo is None or hi is None:
        return None
    return f"{lo:.2f}–{hi:.2f}"


def _fmt_ci(value: Any, ci: Any) -> str:
    """ "0.812 (0.70–0.90)"; just the value when there is no interval."""
    text = _fmt(value)
    interval = _interval(ci)
    return f"{text} ({interval})" if interval and value is not None else text


def _has_ci(records: list[dict[str, Any]]) -> bool:
    return any(_interval(_dict(r.get("ci")).get(k)) for r in records for k in SHOWN)


def _metric_cells(record: dict[str, Any], with_ci: bool) -> list[str]:
    ci = _dict(record.get("ci"))
    return [_fmt_ci(record.get(k), ci.get(k)) if with_ci else _fmt(record.get(k)) for k in SHOWN]


def _metric_header(with_ci: bool) -> list[str]:
    return [f"{h} (95% CI)" for h in SHOWN_LABELS] if with_ci else list(SHOWN_LABELS)


def final_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the final per-site table (last row: the federation), with 95% intervals as
    "0.812 (0.70–0.90)" when the metrics carry them."""
    sites = _final_sites(doc)
    agg = _dict(_final(doc).get("aggregate"))
    with_ci = _has_ci([*sites.values(), agg])
    header = ["site", "held-out cases", *_metric_header(with_ci)]
    rows = [[name, _fmt(m.get("n")), *_metric_cells(m, with_ci)] for name, m in sorted(sites.items())]
    if agg:
        rows.append(["federation", _fmt(agg.get("n")), *_metric_cells(agg, with_ci)])
    return header, rows


def _summary_lines(doc: dict[str, Any]) -> list[tuple[str, str]]:
    prof = _dict(doc.get("profile"))
    feats = _dict(doc.get("features"))
    lines = [
        ("status", str(doc.get("status", "n/a")) + (f": {doc['error']}" if doc.get("error") else "")),
        ("run", str(doc.get("run_id", "n/a"))),
        ("profile", f"{prof.get('name', 'n/a')} v{prof.get('version', 'n/a')} ({str(prof.get('sha256', ''))[:12]})"),
        ("sites", ", ".join(sorted(_dict(doc.get("sites")))) or "none"),
        ("rounds", str(len(_rounds(doc)))),
        ("features", f"{feats.get('n', 'n/a')} selected of {feats.get('agreed', 'n/a')} "
                     f"({feats.get('constant', 0)} near-constant, "
                     f"{feats.get('dropped_correlated', 0)} dropped as correlated"
                     + (f", {feats['dropped_l1']} by LASSO" if feats.get("dropped_l1") else "") + ")"),
        ("model sha256", str(doc.get("model_sha256"))),
        ("wall time", f"{_number(doc.get('seconds')) or 0.0:.1f} s"),
    ]
    drops = [d for d in doc.get("dropouts") or [] if isinstance(d, dict)]
    if drops:
        lines.append(("dropouts", "; ".join(_dropout(d) for d in drops)))
    return lines


def _dropout(d: dict[str, Any]) -> str:
    where = f"round {d['round']} ({d.get('phase')})" if d.get("round") is not None else f"{d.get('phase')} phase"
    return f"{d.get('site')} at {where}: {_short(d.get('reason', ''), 160)}"


# ---------------------------------------------------------------------------------------------- sections


@dataclass
class Section:
    """One report section: its HTML body and the matching Markdown lines."""

    id: str
    title: str
    html: str = ""
    md: list[str] = field(default_factory=list)


@dataclass
class _Context:
    """What every section builder gets besides the document: the site colours and whether to draw
    (Markdown has no figures, so it skips matplotlib)."""

    colours: dict[str, str]
    draw: bool = True

    def figure(self, plot: Callable[..., bytes], *args: Any, alt: str, caption: str) -> str:
        """``<figure>`` with ``plot(*args, colours)`` as an embedded PNG; "" when not drawing."""
        if not self.draw:
            return ""
        png = plot(*args, self.colours)
        return (f'<figure><img src="{plots.data_uri(png)}" alt="{_esc(alt)}">'
                f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _md(value: Any) -> str:
    """Text for a Markdown table cell or line: no raw HTML, no table breaks."""
    s = " ".join(str(value).split())
    return s.replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _md_code(value: Any) -> str:
    s = " ".join(str(value).split()).replace("|", "\\|")
    return f"`` {s} ``" if "`" in s else f"`{s}`"


def _na(why: str) -> Section:
    return Section("", "", f'<p class="na">not available: {_esc(why)}</p>', [f"_not available: {_md(why)}_"])


NOWRAP_CHARS = 24  # "0.812 (0.70–0.90)" and other short cells stay on one line


def _html_table(header: list[str], rows: list[list[str]], code_first: bool = False) -> str:
    head = "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(
        f"<td><code>{_esc(c)}</code></td>" if code_first and i == 0
        else f'<td class="nw">{_esc(c)}</td>' if len(c) <= NOWRAP_CHARS else f"<td>{_esc(c)}</td>"
        for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _md_table(header: list[str], rows: list[list[str]], code_first: bool = False) -> list[str]:
    out = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md_code(c) if code_first and i == 0 else _md(c) for i, c in enumerate(r)) + " |"
            for r in rows]
    return out


def _summary(doc: dict[str, Any], ctx: _Context) -> Section:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in _summary_lines(doc))
    return Section("summary", "Summary", f"<table>{rows}</table>",
                   [f"- **{_md(k)}**: {_md(v)}" for k, v in _summary_lines(doc)])


SITE_COLUMNS = (("manifest", "n-hgg", "HGG"), ("manifest", "n-bm", "BM"), ("manifest", "n-problems", "unusable rows"),
                ("split", "n-cases", "usable"), ("split", "n-failed", "failed"),
                ("split", "n-train-hgg", "train HGG"), ("split", "n-train-bm", "train BM"),
                ("split", "n-test-hgg", "held-out HGG"), ("split", "n-test-bm", "held-out BM"))


def _site_data_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    sites = {str(k): _dict(v) for k, v in _dict(doc.get("sites")).items()}
    header = ["site", *(c[2] for c in SITE_COLUMNS)]
    rows, totals = [], [0] * len(SITE_COLUMNS)
    for name, s in sorted(sites.items()):
        row = [name]
        for i, (part, key, _) in enumerate(SITE_COLUMNS):
            value = _dict(s.get(part)).get(key)
            row.append(_fmt(value))
            totals[i] += value if isinstance(value, int) else 0
        rows.append(row)
    if len(rows) > 1:
        rows.append(["all sites", *(str(t) for t in totals)])
    return header, rows


def _held_out_sizes(doc: dict[str, Any]) -> dict[str, int]:
    sizes = {}
    for name, s in _dict(doc.get("sites")).items():
        split = _dict(_dict(s).get("split"))
        if isinstance(split.get("n-test-hgg"), int) and isinstance(split.get("n-test-bm"), int):
            sizes[str(name)] = split["n-test-hgg"] + split["n-test-bm"]
    for name, m in _final_sites(doc).items():
        if name not in sizes and isinstance(m.get("n"), int):
            sizes[name] = m["n"]
    return sizes


def _limitations(doc: dict[str, Any]) -> list[str]:
    cfg = _dict(doc.get("config"))
    notes = _dict(doc.get("notes"))
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
    loso = _dict(_dict(doc.get("validation")).get("loso"))
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
    cfg = _dict(doc.get("config"))
    done = len(_rounds(doc))
    if str(cfg.get("training", "fedavg")) == "exact":
        return (f"exact federated logistic regression: Newton steps on the sites' summed gradients and Hessians "
                f"(the pooled maximum-likelihood fit, L2 {cfg.get('exact-l2', 'n/a')}, L1 {cfg.get('exact-l1', 0)}); "
                f"{done} step(s) of at most {cfg.get('exact-max-rounds', 'n/a')}; only aggregates left the sites")
    return (f"federated averaging: {done} of {cfg.get('num-server-rounds', 'n/a')} rounds completed, "
            f"{cfg.get('local-epochs', 'n/a')} local epochs, learning rate {cfg.get('learning-rate', 'n/a')}, "
            f"weight decay {cfg.get('weight-decay', 'n/a')}; only aggregates left the sites")


def _privacy_text(cfg: dict[str, Any]) -> str:
    text = f"every statistic a site sent covers at least k = {cfg.get('min-cases-per-class', 5)} cases; "
    noise = _number(cfg.get("dp-noise-multiplier"))
    if noise:
        return text + (f"model updates clipped to L2 norm {cfg.get('dp-clip-norm', 'n/a')} with Gaussian noise "
                       f"(noise multiplier {noise:g}) at each site; no secure aggregation")
    return text + "no differential privacy or secure aggregation"


def _model_card(doc: dict[str, Any], ctx: _Context) -> Section:
    cfg = _dict(doc.get("config"))
    prof = _dict(doc.get("profile"))
    feats = _dict(doc.get("features"))
    notes = _dict(doc.get("notes"))
    lasso = f", then LASSO with select-l1 = {cfg['select-l1']}" if _number(cfg.get("select-l1")) else ""
    harmonisation = str(cfg.get("harmonization", "n/a"))
    if harmonisation == "combat":
        harmonisation = ("distributed ComBat (" + ("parametric" if cfg.get("combat-parametric", True) else
                         "non-parametric") + (", empirical Bayes" if cfg.get("combat-eb", True) else "")
                         + (", location only" if cfg.get("combat-mean-only") else "") + "), site as batch, "
                         + (f"adjusting for {cfg['combat-covariates']}" if cfg.get("combat-covariates")
                            else "no covariates"))
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
        ("harmonisation", harmonisation),
        ("decision threshold", f"{notes.get('threshold', 0.5)} on the predicted probability of HGG"),
        ("evaluation", f"held-out split per site (test fraction {cfg.get('test-fraction', 'n/a')}, split seed "
                       f"{cfg.get('split-seed', 'n/a')}), never used for training, selection or harmonisation fits"
                       + ("; leave-one-site-out external validation"
                          if _dict(_dict(doc.get("validation")).get("loso")) else "")),
        ("privacy", _privacy_text(cfg)),
        ("model sha256", str(doc.get("model_sha256"))),
    ]
    intended = ("Research on federated radiomics methods: comparing sites, harmonisation and training set-ups on "
                "retrospective data. Not a diagnostic device; not validated for, and must not be used in, decisions "
                "about individual patients.")
    limits = _limitations(doc)
    header, rows = _site_data_table(doc)
    body, md = "", []
    if not doc.get("model_sha256"):
        why = _why_no_rounds(doc) if not _rounds(doc) else f"the run ended {doc.get('status', 'early')}"
        no_model = f"No model was produced ({why}); this card describes the configured set-up."
        body, md = f'<p class="na">{_esc(no_model)}</p>', [f"_{_md(no_model)}_", ""]
    body += "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in facts) + "</table>"
    body += f"<h3>Intended use</h3><p>{_esc(intended)}</p>"
    md += [f"- **{_md(k)}**: {_md(v)}" for k, v in facts]
    md += ["", "### Intended use", "", _md(intended)]
    body += "<h3>Data per site (cases)</h3>"
    md += ["", "### Data per site (cases)", ""]
    if rows:
        body += _html_table(header, rows)
        md += _md_table(header, rows)
    else:
        na = _na("no site reported its case counts" + (f" ({_why_no_rounds(doc)})" if not _rounds(doc) else ""))
        body += na.html
        md += na.md
    body += "<h3>Limitations</h3><ul>" + "".join(f"<li>{_esc(x)}</li>" for x in limits) + "</ul>"
    md += ["", "### Limitations", "", *(f"- {_md(x)}" for x in limits)]
    return Section("model-card", "Model card", body, md)


def _final_section(doc: dict[str, Any], ctx: _Context) -> Section:
    if not _final_sites(doc):
        return _na(_why_no_rounds(doc))
    header, rows = final_table(doc)
    notes = _dict(doc.get("notes"))
    body, md = _html_table(header, rows), _md_table(header, rows)
    agg_note = notes.get("aggregate")
    if _has_ci([*_final_sites(doc).values(), _dict(_final(doc).get("aggregate"))]):
        text = ("95% intervals: AUC from its DeLong variance (normal approximation), sensitivity and specificity "
                "Wilson, balanced accuracy normal approximation.")
    else:
        text = "95% intervals: not available (this run's metrics carry none; runs before intervals were added)."
    body += f"<p>{_esc(text)}</p>"
    md += ["", _md(text)]
    if agg_note:
        body += f"<p><em>Federation row: {_esc(agg_note)}.</em></p>"
        md += ["", f"_Federation row: {_md(agg_note)}._"]
    final_round = _final(doc).get("round")
    return Section("final", f"Final held-out metrics (round {final_round}, threshold {notes.get('threshold', 0.5)}, "
                            f"{notes.get('positive_class', 'HGG')} positive)", body, md)


def _curves_of(records: dict[str, dict[str, Any]], key: str) -> tuple[dict[str, Any], list[str]]:
    have = {name: r[key] for name, r in records.items() if isinstance(r.get(key), dict)}
    return have, sorted(set(records) - set(have))


def _roc_section(doc: dict[str, Any], ctx: _Context) -> Section:
    sites = _final_sites(doc)
    if not sites:
        return _na(_why_no_rounds(doc))
    curves, missing = _curves_of(sites, "roc")
    if not curves:
        return _na("the sites sent no ROC points (runs before curves were reported)")
    caption = ("Each point is an operating threshold; every step between points covers at least k held-out cases, "
               "so the curves are coarse on purpose.")
    body = ctx.figure(plots.roc_png, curves, "held-out ROC per site (final model)",
                      {n: sites[n].get("auc") for n in curves}, alt="ROC curves per site", caption=caption)
    md = [f"ROC curves of {len(curves)} site(s): figure in report.html."]
    if missing:
        body += f'<p class="na">not available for {_esc(", ".join(missing))}: no ROC points sent</p>'
        md.append(f"_not available for {_md(', '.join(missing))}: no ROC points sent_")
    return Section("roc", "ROC curves (held-out, final model)", body, md)


def _calibration_section(doc: dict[str, Any], ctx: _Context) -> Section:
    sites = _final_sites(doc)
    if not sites:
        return _na(_why_no_rounds(doc))
    bins, missing = _curves_of(sites, "calibration")
    if not bins:
        return _na("the sites sent no calibration bins (runs before curves were reported)")
    caption = ("Mean predicted probability of HGG against the observed HGG rate, per bin of at least k held-out "
               "cases (marker area: cases). Points on the diagonal are well calibrated.")
    body = ctx.figure(plots.calibration_png, bins, "reliability diagram (held-out, final model)",
                      alt="calibration per site", caption=caption)
    header = ["site", "bin", "mean predicted", "observed HGG rate", "cases"]
    rows = []
    for name in sorted(bins):
        b = bins[name]
        for i, (p, o, n) in enumerate(zip(b.get("predicted") or [], b.get("observed") or [], b.get("n") or [],
                                          strict=False), start=1):
            rows.append([name, str(i), _fmt(_number(p)), _fmt(_number(o)), _fmt(n)])
    md = _md_table(header, rows)
    if missing:
        body += f'<p class="na">not available for {_esc(", ".join(missing))}: no calibration bins sent</p>'
        md.append(f"_not available for {_md(', '.join(missing))}: no calibration bins sent_")
    return Section("calibration", "Calibration (held-out, final model)", body, md)


def _training_section(doc: dict[str, Any], ctx: _Context) -> Section:
    rounds = _rounds(doc)
    if not rounds:
        return _na(_why_no_rounds(doc))
    loss: dict[str, list[tuple[Any, Any]]] = {}
    auc: dict[str, list[tuple[Any, Any]]] = {}
    fed = []
    for rnd in rounds:
        r = rnd.get("round")
        for name, m in _dict(_dict(rnd.get("train")).get("sites")).items():
            loss.setdefault(str(name), []).append((r, _number(_dict(m).get("loss"))))
        ev = _dict(rnd.get("evaluate"))
        for name, m in _dict(ev.get("sites")).items():
            auc.setdefault(str(name), []).append((r, _number(_dict(m).get("auc"))))
        fed.append((r, _number(_dict(ev.get("aggregate")).get("auc"))))
    sites = sorted(set(auc) | set(_final_sites(doc)))
    header = ["round", "federation", *sites]
    rows = []
    for rnd in rounds:
        ev = _dict(rnd.get("evaluate"))
        if not _dict(ev.get("sites")):
            continue  # trained, not evaluated (an exact fit's Newton steps)
        rows.append([_fmt(rnd.get("round")), _fmt(_dict(ev.get("aggregate")).get("auc")),
                     *(_fmt(_dict(_dict(ev.get("sites")).get(s)).get("auc")) for s in sites)])
    caption = ("Left: each site's mean training loss over its local epochs. Right: held-out AUC per site after each "
               "round, and the federation's (case-weighted mean of site AUCs).")
    body = (ctx.figure(plots.training_png, loss, auc, fed, alt="training loss and held-out AUC per round",
                       caption=caption)
            + "<details><summary>held-out AUC per round (table)</summary>" + _html_table(header, rows) + "</details>")
    return Section("training", "Training curves per round", body, ["Held-out AUC per round:", "",
                                                                   *_md_table(header, rows)])


def _harmonization_section(doc: dict[str, Any], ctx: _Context) -> Section:
    cfg = _dict(doc.get("config"))
    features = _dict(_dict(doc.get("harmonization")).get("features"))
    if not features:
        if str(cfg.get("harmonization", "")) == "none":
            return _na('harmonisation was off in this run (harmonization = "none")')
        if not _rounds(doc):
            return _na(_why_no_rounds(doc))
        return _na("this run's metrics carry no before/after histograms (runs before they were reported)")
    shown = list(features)[:HISTOGRAM_FEATURES]
    body = ("<p>" + _esc("Distributions of model features per site before and after harmonisation, aggregated at each "
                         "site: every bin count is 0 or at least k cases (neighbouring bins merged where needed), so "
                         "steps can be uneven. Densities are per site, so sites of different sizes compare.") + "</p>")
    md = []
    for name in shown:
        f = _dict(features[name])
        try:
            body += ctx.figure(plots.harmonization_png, name, f.get("edges") or [], _dict(f.get("sites")),
                               alt=f"{name} before and after harmonisation", caption=name)
            md.append(f"- {_md_code(name)}: {len(_dict(f.get('sites')))} site(s), figure in report.html")
        except ValueError as exc:
            body += f'<p class="na">not available for {_esc(name)}: {_esc(exc)}</p>'
            md.append(f"- {_md_code(name)}: _not available: {_md(exc)}_")
    if len(features) > len(shown):
        more = f"showing {len(shown)} of {len(features)} features"
        body += f"<p>{_esc(more)}</p>"
        md.append(f"- {more}")
    return Section("harmonization", "Harmonisation before/after", body, md)


def _features_section(doc: dict[str, Any], ctx: _Context) -> Section:
    selected = _dict(_dict(doc.get("features")).get("selected"))
    if not selected:
        return _na(_why_no_rounds(doc) if not _rounds(doc) else "no selected features recorded")
    rows = [[str(n), f"{t:+.2f}" if _number(t) is not None else "n/a"] for n, t in selected.items()]
    return Section("features", "Selected features (Welch's t, HGG vs BM, pooled training data)",
                   _html_table(["feature", "t"], rows, code_first=True), _md_table(["feature", "t"], rows, True))


def _validation_section(doc: dict[str, Any], ctx: _Context) -> Section:
    validation = _dict(doc.get("validation"))
    loso = {str(k): _dict(v) for k, v in _dict(validation.get("loso")).items()}
    baselines = _dict(validation.get("baselines"))
    if not loso and not baselines:
        if not _rounds(doc) and doc.get("status") != "completed":
            return _na(_why_no_rounds(doc))
        return _na("leave-one-site-out validation was not run")
    body, md = "", []
    if loso:
        ok = [r for r in loso.values() if "error" not in r]
        with_ci = _has_ci(ok)
        header = ["held-out site", "trained on", "cases", *_metric_header(with_ci)]
        rows = []
        for name, r in sorted(loso.items()):
            trained = ", ".join(str(s) for s in r.get("trained_on") or []) or "the other sites"
            if "error" in r:
                rows.append([name, trained, "n/a", f"failed: {_short(r['error'], 160)}", *([""] * (len(SHOWN) - 1))])
            else:
                rows.append([name, trained, _fmt(r.get("n")), *_metric_cells(r, with_ci)])
        intro = ("Each row: a model trained from scratch by the other sites (moments, feature selection and training "
                 "redone without the held-out site), scored on all of the held-out site's usable cases.")
        body += f"<p>{_esc(intro)}</p>" + _html_table(header, rows)
        md += [_md(intro), "", *_md_table(header, rows)]
        curves, _ = _curves_of(loso, "roc")
        if curves:
            body += ctx.figure(plots.roc_png, curves, "leave-one-site-out ROC (each site unseen in training)",
                               {n: loso[n].get("auc") for n in curves}, alt="leave-one-site-out ROC curves",
                               caption="ROC at each site of the model trained without it.")
            md += ["", f"Leave-one-site-out ROC curves of {len(curves)} site(s): figure in report.html."]
        else:
            na = _na("no leave-one-site-out ROC points")
            body += na.html
            md += ["", *na.md]
    if baselines:
        keys = [k for k in SHOWN if any(k in _dict(b) for b in baselines.values())]
        keys += sorted({k for b in baselines.values() for k in _dict(b)} - set(keys) - {"ci"})
        with_ci = _has_ci([_dict(b) for b in baselines.values()])
        labels = dict(zip(SHOWN, _metric_header(with_ci), strict=True))
        header = ["baseline", *(labels.get(k, k) for k in keys)]
        rows = []
        for name, b in sorted(baselines.items()):
            if not isinstance(b, dict):
                rows.append([str(name), _short(b, 160), *([""] * (len(keys) - 1))])
                continue
            ci = _dict(b.get("ci"))
            rows.append([str(name), *(_fmt_ci(b.get(k), ci.get(k)) if k in SHOWN else _short(_fmt(b.get(k)), 160)
                                      for k in keys)])
        body += "<h3>Baselines</h3>" + _html_table(header, rows)
        md += ["", "### Baselines", "", *_md_table(header, rows)]
    if validation.get("note"):
        body += f"<p>{_esc(validation['note'])}</p>"
        md += ["", _md(validation["note"])]
    return Section("validation", "External validation (leave-one-site-out)", body, md)


SECTIONS: list[tuple[str, str, Callable[[dict[str, Any], _Context], Section]]] = [
    ("summary", "Summary", _summary),
    ("model-card", "Model card", _model_card),
    ("final", "Final held-out metrics", _final_section),
    ("roc", "ROC curves (held-out, final model)", _roc_section),
    ("calibration", "Calibration (held-out, final model)", _calibration_section),
    ("training", "Training curves per round", _training_section),
    ("harmonization", "Harmonisation before/after", _harmonization_section),
    ("features", "Selected features", _features_section),
    ("validation", "External validation (leave-one-site-out)", _validation_section),
]


def _all_site_names(doc: dict[str, Any]) -> set[str]:
    names = set(_dict(doc.get("sites"))) | set(_final_sites(doc))
    for rnd in _rounds(doc):
        names |= set(_dict(_dict(rnd.get("evaluate")).get("sites")))
        names |= set(_dict(_dict(rnd.get("train")).get("sites")))
    names |= set(_dict(_dict(doc.get("validation")).get("loso")))
    for f in _dict(_dict(doc.get("harmonization")).get("features")).values():
        names |= set(_dict(_dict(f).get("sites")))
    return {str(n) for n in names}


def sections(doc: dict[str, Any], draw: bool = True) -> list[Section]:
    """Every section in order (figures only if ``draw``); one that cannot be built says why instead of
    stopping the report."""
    ctx = _Context(plots.site_colours(_all_site_names(doc)), draw)
    out = []
    for sid, title, build in SECTIONS:
        try:
            sec = build(doc, ctx)
        except Exception as exc:  # a report must always be written: the section says what broke
            log.warning("report section %s could not be built: %s: %s", sid, type(exc).__name__, exc)
            sec = _na(f"could not be built from this run's metrics ({type(exc).__name__}: {_short(exc, 160)})")
        sec.id, sec.title = sec.id or sid, sec.title or title
        out.append(sec)
    return out


FOOTER = "Research use only: not a diagnostic device."


def render_markdown(doc: dict[str, Any]) -> str:
    lines = ["# radfed run report", ""]
    for sec in sections(doc, draw=False):
        if sec.id == "summary":
            lines += [*sec.md, ""]
        else:
            lines += [f"## {sec.title}", "", *sec.md, ""]
    lines += [FOOTER, ""]
    return "\n".join(lines)


CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:62em;padding:0 1em;color:#222;
line-height:1.4}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f4f4f4}
img{max-width:100%;height:auto}figure{margin:1em 0}figcaption{font-size:.85em;color:#555;max-width:48em}
.na{color:#8a5300}.nw{white-space:nowrap}nav a{margin-right:.8em}section{border-top:1px solid #ddd;margin-top:1.5em}
code{font-size:.9em}details{margin:.5em 0}"""


def render_html(doc: dict[str, Any]) -> str:
    secs = sections(doc)
    nav = "".join(f'<a href="#{_esc(s.id)}">{_esc(s.title.split(" (")[0])}</a>' for s in secs)
    body = "\n".join(f'<section id="{_esc(s.id)}"><h2>{_esc(s.title)}</h2>\n{s.html}</section>' for s in secs)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>radfed run {_esc(doc.get('run_id', ''))}</title>
<style>{STYLE}</style></head>
<body><h1>radfed run report</h1>
<nav>{nav}</nav>
{body}
<p><strong>{_esc(FOOTER)}</strong></p></body></html>
"""

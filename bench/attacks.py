"""An honest-but-curious coordinator, replayed against one site's real ClientApp (in-process, real messages).

The coordinator controls every run setting and runs as often as the site approves; it follows the protocol
and keeps every reply. What it can compute from them is measured here, against the site's true feature
table. Only APIs every radfed version has are used (``client.app.app``, ``client.steps.load_site_data``,
``radfed.cli.approve_demo_plan``), so ``bench/bench_release.py`` can run the same attacks on an older
checkout for the "before" column, and ``tests/test_redteam_release.py`` on this one.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

CLASSES = {"hgg": 1, "bm": 0}


@dataclass
class SiteRun:
    """What one run released (or the site's refusal) and, for scoring only, the site's true split."""

    config: dict[str, object]
    features: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # n-hgg, n-bm of the training split's moments
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # class -> sum of features over training cases
    evaluation: dict[str, float] = field(default_factory=dict)
    refused: str = ""
    # with ``raw_crossproducts``: Σ x xᵀ over the training cases of the first features (from the correlation
    # query's cross-products before ComBat, Σ (x − x̄)(x − x̄)ᵀ, and the moments' sums)
    second: np.ndarray | None = None


class Coordinator:
    """Sends plan, features, moments (and optionally an evaluation) to one site, run after run."""

    def __init__(self, site: Path) -> None:
        self.site = site
        self.run_id = 1000
        self.runs: list[SiteRun] = []

    def _send(self, context: Context, message_type: str, content: RecordDict) -> Message:
        from client.app import app

        meta = Metadata(run_id=context.run_id, message_id=f"{context.run_id}-{message_type}-{time.monotonic_ns()}",
                        src_node_id=0, dst_node_id=context.node_id, reply_to_message_id="", group_id="1",
                        created_at=time.time(), ttl=3600.0, message_type=message_type)
        return app(Message(content, metadata=meta), context)

    def _join(self, context: Context, names: list[str], fold: str) -> None:
        """Harmonise the site against neutral pooled ComBat estimates (grand mean 0, variance 1) for ``fold``."""
        from common import covariates
        from common.canon import sha256_json

        d = len(names)
        p = len(covariates.columns(covariates.parse(str(context.run_config.get("combat-covariates", "")))))
        arrays = ArrayRecord({"grand-mean": Array(np.zeros(d)), "var-pooled": Array(np.ones(d)),
                              "beta-cov": Array(np.zeros((p, d))), "zero-variance": Array(np.zeros(d))})
        config = {"features": names, "features-sha256": sha256_json(names), "n-sites": 1, "n-pooled": 100,
                  "fold": fold}
        self._send(context, "query.combat_join", RecordDict({"config": ConfigRecord(config), "arrays": arrays}))

    def run(self, evaluate_state: Mapping[str, np.ndarray] | None = None, combat: bool = False, fold: str = "",
            raw_crossproducts: int = 0, **overrides: object) -> SiteRun:
        """One run with these run-config overrides; the site approves its plan first (it always does here).
        ``combat``: also the first ComBat round (XᵀX, XᵀY over the training cases and covariate levels).
        ``fold``: the moments of that cohort (e.g. "cv:0:1": the training cases of fold 1 of the first
        cross-validation repeat). ``raw_crossproducts``: also the correlation query over that many of the agreed
        features, asking for their cross-products before ComBat (what a leave-one-site-out run's main run asks)."""
        from common.canon import sha256_json
        from radfed.cli import approve_demo_plan
        from radfed.launch import app_run_config

        self.run_id += 1
        config = app_run_config({"data-root": str(self.site.parent), **overrides})
        approve_demo_plan([self.site], config)
        context = Context(run_id=self.run_id, node_id=7, node_config={"site-dir": str(self.site)},
                          state=RecordDict(), run_config=config)
        result = SiteRun(config=dict(overrides))
        self.runs.append(result)
        try:
            plan = self._send(context, "query.plan", RecordDict({"config": ConfigRecord({})}))
            if str(plan.content["config"]["status"]) != "ok":
                result.refused = str(plan.content["config"]["reason"])
                return result
            reply = self._send(context, "query.features", RecordDict({"config": ConfigRecord({})}))
            names = [str(n) for n in reply.content["config"]["features"]]
            result.features = names
            agreed = {"features": names, "features-sha256": sha256_json(names)}
            if combat:
                self._send(context, "query.combat_fit", RecordDict({"config": ConfigRecord(
                    {**agreed, "n-sites": 1, "site-index": 0})}))
            tag = {"fold": fold} if fold else {}
            reply = self._send(context, "query.moments", RecordDict({"config": ConfigRecord({**agreed, **tag})}))
            metrics, arrays = reply.content["metrics"], reply.content["arrays"]
            for tag in CLASSES:
                n = int(metrics[f"n-{tag}"])
                result.counts[f"n-{tag}"] = n
                result.sums[tag] = arrays[f"mean-{tag}"].numpy() * n
            if raw_crossproducts:
                result.second = self._second_moments(context, names[:raw_crossproducts], result)
            if evaluate_state is not None:
                selected = list(evaluate_state["features"])
                config = {"features": selected, "features-sha256": sha256_json(selected), "pos-weight": 1.0,
                          "server-round": 1, "split": "all", "fold": "attack"}
                state = ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32))
                                     for k, v in evaluate_state.items() if k != "features"})
                if context.run_config.get("harmonization") == "combat" and _answers_join():
                    self._join(context, names, "attack")  # a fold's site harmonises itself before it scores
                reply = self._send(context, "evaluate", RecordDict({"config": ConfigRecord(config), "arrays": state}))
                result.evaluation = {k: float(v) for k, v in reply.content["metrics"].items()}
        except Exception as exc:  # the site refused (the guard raises: nothing was sent)
            result.refused = str(exc)
        return result


    def _second_moments(self, context: Context, candidates: list[str], result: SiteRun) -> np.ndarray:
        """Σ x xᵀ over the training cases of ``candidates`` (the first of the agreed features): the correlation
        query's cross-products before ComBat plus n x̄ x̄ᵀ from the moments' class sums."""
        from common.canon import sha256_json

        m = len(candidates)
        config = {"candidates": candidates, "candidates-sha256": sha256_json(candidates), "raw-crossproducts": True}
        stats = ArrayRecord({"mean": Array(np.zeros(m)), "std": Array(np.ones(m))})
        reply = self._send(context, "query.correlation", RecordDict({"config": ConfigRecord(config), "arrays": stats}))
        if reply.has_error():
            raise RuntimeError(reply.error.reason)
        n = sum(result.counts.values())
        mean = sum(result.sums.values())[:m] / n
        return reply.content["arrays"]["raw-crossproducts"].numpy() + n * np.outer(mean, mean)


def _answers_join() -> bool:
    """Whether this radfed version has the fold join (older checkouts, run by bench_release, do not)."""
    from common import protocol

    return hasattr(protocol, "COMBAT_JOIN")


def site_truth(site: Path, config: Mapping[str, object]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The site's own (case ids, labels, training mask, feature matrix) for a run config: used to score the
    attacks (the worst case: a coordinator that knows which patients each run used)."""
    from client.steps import load_site_data
    from radfed.launch import app_run_config

    data = load_site_data(site, app_run_config({"data-root": str(site.parent), **config}))
    return list(data.table.case_ids), data.table.labels, ~data.held_out, data.table.values


def _recovered(vector: np.ndarray, rows: np.ndarray, tol: float = 1e-6) -> tuple[int, float]:
    """(row index, relative error) of the patient whose features ``vector`` equals, or (-1, best error)."""
    scale = np.maximum(np.abs(rows), 1e-12)
    errors = np.nanmax(np.abs(rows - vector) / scale, axis=1)
    best = int(np.nanargmin(errors))
    return (best if errors[best] < tol else -1), float(errors[best])


def subtract_pairs(coordinator: Coordinator, truth: dict[str, np.ndarray]) -> list[dict[str, object]]:
    """Every pair of runs whose class counts differ by exactly one: is the difference of their class sums one
    patient's features? ``truth``: case id -> feature vector over the runs' agreed features."""
    ids = list(truth)
    rows = np.array([truth[i] for i in ids])
    found = []
    done = [r for r in coordinator.runs if not r.refused]
    for a, b in itertools.combinations(done, 2):
        for tag in CLASSES:
            dn = a.counts[f"n-{tag}"] - b.counts[f"n-{tag}"]
            if abs(dn) != 1:
                continue
            diff = (a.sums[tag] - b.sums[tag]) * dn
            index, error = _recovered(diff, rows)
            found.append({"runs": (a.config, b.config), "class": tag, "patient": ids[index] if index >= 0 else "",
                          "relative_error": error})
    return found


def solve_patients(coordinator: Coordinator, memberships: list[dict[str, set[str]]],
                   truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Least-squares recovery from every run's class sums, knowing which patients each covered: patient ->
    relative error of its recovered features, for every patient whose indicator lies in the sets' span."""
    ids = list(truth)
    done = [(r, m) for r, m in zip(coordinator.runs, memberships, strict=True) if not r.refused]
    rows, sums = [], []
    for run, member in done:
        for tag in CLASSES:
            rows.append([1.0 if c in member[tag] else 0.0 for c in ids])
            sums.append(run.sums[tag])
    if not rows:
        return {}
    m, s = np.array(rows), np.array(sums)
    recovered = {}
    for j, case_id in enumerate(ids):
        target = np.zeros(len(ids))
        target[j] = 1.0
        coef, *_ = np.linalg.lstsq(m.T, target, rcond=None)  # e_j as a combination of the released sets
        if np.max(np.abs(m.T @ coef - target)) < 1e-8:
            recovered[case_id] = _recovered(coef @ s, np.array([truth[case_id]]))[1]
    return recovered


def solve_second_moments(coordinator: Coordinator, memberships: list[set[str]],
                         truth: dict[str, np.ndarray]) -> dict[str, float]:
    """``solve_patients`` for the runs' Σ x xᵀ over their training cases (``SiteRun.second``), knowing each run's
    training cases (``memberships``): patient -> relative error of its recovered x xᵀ, for every patient whose
    indicator lies in the sets' span. ``truth``: case id -> its features over the same first features."""
    ids = list(truth)
    done = [(r, m) for r, m in zip(coordinator.runs, memberships, strict=True)
            if not r.refused and r.second is not None]
    if not done:
        return {}
    rows = np.array([[1.0 if c in member else 0.0 for c in ids] for _, member in done])
    seconds = np.array([run.second.ravel() for run, _ in done])  # type: ignore[union-attr]
    recovered = {}
    for j, case_id in enumerate(ids):
        target = np.zeros(len(ids))
        target[j] = 1.0
        coef, *_ = np.linalg.lstsq(rows.T, target, rcond=None)
        if np.max(np.abs(rows.T @ coef - target)) < 1e-8:
            outer = np.outer(truth[case_id], truth[case_id]).ravel()
            recovered[case_id] = float(np.max(np.abs(coef @ seconds - outer)) / max(np.abs(outer).max(), 1e-12))
    return recovered

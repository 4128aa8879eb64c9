"""Metrics a clinical reader expects, for the federation's pooled held-out predictions, from aggregates only
(pure numpy).

Every metric has two halves:

- a **site** half (``site_*``, ``k_safe_thresholds``) run on the site's own held-out cases (labels ``y``: 1 HGG,
  0 BM; ``prob``: the global model's HGG probability). It returns only counts and sums over sets of >= k of the
  site's cases, refuses (``ValueError``) a class with 1 to k - 1 cases or a k below 5, and every array it returns
  has a size fixed by what the server sent (bins, thresholds), never by the number of cases;
- a **server** half (``pooled_*``, ``fit_recalibration``) that combines several sites' replies into the value the
  pooled predictions would give: pooled AUC (not a mean of site AUCs) with a binning error bound and a variance,
  calibration slope and intercept (exact), Brier score (exact) and decision-curve net benefit.

All sites must score the same model: the metrics describe one model's pooled predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from common.metrics import Z95

K_FLOOR = 5
# Probabilities are clipped to [PROB_EPS, 1 - PROB_EPS] before the logit, so a score of exactly 0 or 1 stays finite.
PROB_EPS = 1e-12


def _check_site(y: np.ndarray, prob: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels as bool and probabilities as float64; refuses a k below the floor or a class of 1 to k - 1 cases
    (its totals would be a count below k)."""
    if k < K_FLOOR:
        raise ValueError(f"k = {k} is below the floor of {K_FLOOR} cases")
    y = np.asarray(y).astype(bool)
    prob = np.asarray(prob, dtype=np.float64)
    if y.shape != prob.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and probabilities {prob.shape} must be two vectors of one length")
    for name, n in (("HGG", int(y.sum())), ("BM", int((~y).sum()))):
        if 0 < n < k:
            raise ValueError(f"{n} {name} cases are fewer than k = {k}; nothing is computed")
    if len(y) < k:
        raise ValueError(f"{len(y)} cases are fewer than k = {k}; nothing is computed")
    return y, prob


def logit(prob: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) with p clipped to [PROB_EPS, 1 - PROB_EPS]."""
    p = np.clip(np.asarray(prob, dtype=np.float64), PROB_EPS, 1 - PROB_EPS)
    return np.log(p) - np.log1p(-p)


# ---------------------------------------------------------------- pooled AUC from k-anonymous histograms

def score_edges(bins: int, scale: str = "logit", span: float = 8.0) -> np.ndarray:
    """(bins + 1,) probability edges the server sends: equal steps of the logit over [-span, span], or of the
    probability over [0, 1]. Only their order matters for the bound; logit steps resolve scores near 0 and 1."""
    if bins < 1:
        raise ValueError("at least one bin")
    if scale == "logit":
        return 1.0 / (1.0 + np.exp(-np.linspace(-span, span, bins + 1)))
    if scale == "probability":
        return np.linspace(0.0, 1.0, bins + 1)
    raise ValueError(f"scale must be 'logit' or 'probability', not {scale!r}")


def _bin_index(prob: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each score, [edges[j], edges[j+1]) -> j; beyond the edges, the end bins. Non-decreasing in the
    score, which is all the AUC range needs."""
    b = len(edges) - 1
    return np.clip(np.searchsorted(edges, prob, side="right") - 1, 0, b - 1)


def _k_groups(raw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(b,) start and end arrays: adjacent bins merged left to right until a group holds >= k cases; each group's
    count at its first and at its last occupied bin. A remainder of 1 to k - 1 cases joins the last group."""
    start, end = np.zeros(len(raw)), np.zeros(len(raw))
    total, first, last = 0, -1, -1
    for i, count in enumerate(raw):
        if count and total == 0:
            first = i
        total += int(count)
        if total >= k:
            start[first] = end[i] = total
            total, last = 0, i
    if total:  # a class of >= k cases always closed a group before its remainder
        first = int(np.flatnonzero(start)[-1])
        end[last] = 0
        start[first] = end[np.flatnonzero(raw)[-1]] = start[first] + total
    return start, end


def site_score_histograms(y: np.ndarray, prob: np.ndarray, edges: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Site: per-class score histograms whose every count is 0 or >= k.

    y, prob: (n,) the site's held-out labels and HGG probabilities; edges: (b + 1,) the server's.
    Returns ``start`` and ``end``, (2, b) each, row 0 BM, row 1 HGG. Each row is merged on its own, left to right,
    into groups of >= k cases of that class; a group's count stands at its first occupied bin in ``start`` and at
    its last in ``end`` (both at one bin for a group within one bin). Every entry is 0 or >= k.

    What it releases: per class, counts over disjoint sets of >= k cases (summed, the class totals the site already
    sends), so any sum or difference of them covers >= k cases. Each case is described only as lying in its
    group's range of bins, which >= k - 1 others share (k-anonymity by generalisation, as in Mondrian); that
    range's first and last bins each hold at least one of its cases, placed within one bin of the server's grid
    (never counted). So the edges must be no finer than the resolution at which a score may be known: they are the
    server's, fixed in advance and agreed. Merging per site and class, rather than on a partition common to all
    sites, keeps every group as narrow as the site's own cases allow (:func:`pooled_auc` copes with groups that
    differ between sites). These sets are not the ROC or calibration groups; a guard that releases both over one
    evaluation must check them together (the release ledger).
    """
    y, prob = _check_site(y, prob, k)
    edges = np.asarray(edges, dtype=np.float64)
    idx = _bin_index(prob, edges)
    b = len(edges) - 1
    rows = [_k_groups(np.bincount(idx[y == label], minlength=b), k) for label in (False, True)]
    return {"start": np.vstack([s for s, _ in rows]), "end": np.vstack([e for _, e in rows])}


def _groups(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first bin, last bin, count) of every group in one row of :func:`site_score_histograms`."""
    lo, hi = np.flatnonzero(start), np.flatnonzero(end)
    if len(lo) != len(hi) or np.any(start[lo] != end[hi]) or np.any(lo > hi) or np.any(hi[:-1] >= lo[1:]):
        raise ValueError("start and end do not describe consecutive groups")
    return lo, hi, end[hi]


def _win_share(lo: np.ndarray, hi: np.ndarray, other_lo: np.ndarray, other_hi: np.ndarray) -> np.ndarray:
    """(g, h): for a case spread uniformly over bins lo..hi of its group and another over other_lo..other_hi,
    the chance the first is higher (bins as unit intervals). 0 or 1 for groups that do not overlap; 1/2 for two
    groups of the same bins."""
    a, w = lo[:, None].astype(np.float64), (hi - lo + 1)[:, None].astype(np.float64)
    c, v = other_lo[None, :].astype(np.float64), (other_hi - other_lo + 1)[None, :].astype(np.float64)

    def integral(x: np.ndarray) -> np.ndarray:  # of the other's cdf, from -inf to x
        return np.where(x <= c, 0.0, np.where(x >= c + v, v / 2 + (x - c - v), (x - c) ** 2 / (2 * v)))

    return (integral(a + w) - integral(a)) / w


def pooled_auc(site_histograms: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Server: AUC of the pooled cases of all sites from their :func:`site_score_histograms` ((2, b) ``start`` and
    ``end`` each, one b), the range the exact AUC lies in, and a DeLong-style variance.

    Each case is known to lie in one group of bins (its site's and class's). A (HGG, BM) pair whose groups do not
    overlap is ordered: bin indices never decrease with the score, so a BM case in wholly lower bins has a lower
    score, and the pair adds exactly 1 (or 0) to the Mann-Whitney sum, as in the exact AUC (ties 1/2, as
    scikit-learn). A pair whose groups overlap adds something in [0, 1] the histograms cannot tell. So, with W the
    ordered pairs the HGG case wins and A the overlapping pairs, the exact pooled AUC lies in

        [low, high] = [W / (N_pos N_neg), (W + A) / (N_pos N_neg)].

    ``auc`` counts each overlapping pair as the chance the HGG case is higher were both spread uniformly over
    their groups' bins: 1/2 for two groups of the same bins (ties within a bin counted 1/2), more when the HGG
    group reaches higher. ``bound`` = max(auc - low, high - auc), so |exact - auc| <= bound. When every group is
    one bin, groups overlap only within a bin, A = sum over bins of n_pos_b n_neg_b and
    bound = sum_b n_pos_b n_neg_b / (2 N_pos N_neg). Summing all sites' groups into a partition common to them
    (merging adjacent bins until every site's group lies within one merged bin) could only widen [low, high]:
    groups that overlap always share a merged bin. The range shrinks as bins get finer, down to the overlap of
    the k-merged groups themselves.

    Variance: DeLong's, from each case's placement value among the other class with the same pair shares; equal
    to ``metrics.delong_variance`` on scores replaced by their bin when no bins were merged.
    Returns ``auc``, ``bound``, ``low``, ``high``, ``variance``, ``n_pos``, ``n_neg`` (NaN AUC when a class is absent
    from every site).
    """
    if not site_histograms:
        raise ValueError("no site histograms")
    shape = np.shape(site_histograms[0]["end"])
    parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[], []]
    for h in site_histograms:
        start, end = np.asarray(h["start"], dtype=np.float64), np.asarray(h["end"], dtype=np.float64)
        if start.shape != shape or end.shape != shape or len(shape) != 2 or shape[0] != 2:
            raise ValueError("every site's start and end must be (2, b) with one b")
        for label in (0, 1):
            parts[label].append(_groups(start[label], end[label]))
    neg_lo, neg_hi, neg_n = (np.concatenate(a) for a in zip(*parts[0], strict=True))
    pos_lo, pos_hi, pos_n = (np.concatenate(a) for a in zip(*parts[1], strict=True))
    n_pos, n_neg = float(pos_n.sum()), float(neg_n.sum())
    nan = float("nan")
    if n_pos == 0 or n_neg == 0:
        return {"auc": nan, "bound": nan, "low": nan, "high": nan, "variance": nan, "n_pos": n_pos, "n_neg": n_neg}
    share = _win_share(pos_lo, pos_hi, neg_lo, neg_hi)  # (HGG groups, BM groups)
    overlap = (pos_lo[:, None] <= neg_hi[None, :]) & (neg_lo[None, :] <= pos_hi[:, None])
    pairs = n_pos * n_neg
    low = float(pos_n @ ((neg_hi[None, :] < pos_lo[:, None]) @ neg_n) / pairs)
    high = low + float(pos_n @ (overlap @ neg_n) / pairs)
    # DeLong placement values: each HGG case's share of BM cases below it, each BM case's share of HGG above it
    v10 = share @ neg_n / n_neg
    v01 = pos_n @ share / n_pos
    auc = float(pos_n @ v10 / n_pos)
    variance = nan
    if n_pos >= 2 and n_neg >= 2:
        variance = float(pos_n @ (v10 - auc) ** 2 / ((n_pos - 1) * n_pos)
                         + neg_n @ (v01 - auc) ** 2 / ((n_neg - 1) * n_neg))
    return {"auc": auc, "bound": max(auc - low, high - auc), "low": low, "high": high, "variance": variance,
            "n_pos": n_pos, "n_neg": n_neg}


def pooled_roc(site_histograms: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Server: the ROC curve whose area is :func:`pooled_auc`'s ``auc``, from the same histograms.

    Each group's cases are spread evenly over its bins (the assumption behind ``auc``), so each class has a
    piecewise-uniform density over the bins; its ROC is straight between bin edges, and the points at every bin
    edge, joined by lines, are the whole curve: its trapezoid area equals ``auc`` (up to rounding). Returns
    ``fpr`` and ``tpr`` (b + 1,), from (0, 0) (threshold above every bin) to (1, 1); empty arrays when a class is
    absent from every site. Nothing here is new: it re-reads the counts the sites sent.
    """
    if not site_histograms:
        raise ValueError("no site histograms")
    bins = np.shape(site_histograms[0]["end"])[-1]
    spread = np.zeros((2, bins))
    for h in site_histograms:
        start, end = np.asarray(h["start"], dtype=np.float64), np.asarray(h["end"], dtype=np.float64)
        for label in (0, 1):
            for lo, hi, n in zip(*_groups(start[label], end[label]), strict=True):
                spread[label, lo:hi + 1] += n / (hi - lo + 1)
    totals = spread.sum(axis=1)
    if np.any(totals == 0):
        return {"fpr": np.empty(0), "tpr": np.empty(0)}
    above = np.cumsum(spread[:, ::-1], axis=1) / totals[:, None]  # share of each class at or above each edge
    fpr, tpr = np.r_[0.0, above[0]], np.r_[0.0, above[1]]
    fpr[-1] = tpr[-1] = 1.0  # exactly, not 1 - rounding
    return {"fpr": fpr, "tpr": tpr}


def auc_interval(result: Mapping[str, float], z: float = Z95) -> tuple[float, float]:
    """95% interval of the pooled AUC from :func:`pooled_auc`: the normal interval around ``auc`` widened by the
    binning range on each side (``low`` below, ``high`` above: the binning error is not random, so it adds to the
    sampling error), clipped to [0, 1]."""
    auc, var = float(result["auc"]), float(result["variance"])
    if not (np.isfinite(auc) and np.isfinite(var)):
        return float("nan"), float("nan")
    half = z * np.sqrt(var)
    return float(max(float(result["low"]) - half, 0.0)), float(min(float(result["high"]) + half, 1.0))


# ---------------------------------------------------------------- calibration slope and intercept

def site_recalibration_terms(y: np.ndarray, prob: np.ndarray, params: np.ndarray, k: int) -> dict[str, Any]:
    """Site: the logistic recalibration model y ~ a + b logit(p) at the server's params = (a, b), over all the
    site's held-out cases (one set of >= k cases, the same at every round).

    Returns ``gradient`` (2,) and ``hessian`` (2, 2) of the summed negative log-likelihood with respect to (a, b),
    ``loss`` (that sum, a float) and ``n``. Each round releases these 6 sums at new params; the server needs few
    rounds (Newton), and caps them.
    """
    y, prob = _check_site(y, prob, k)
    a, b = (float(v) for v in np.asarray(params, dtype=np.float64))
    design = np.column_stack([np.ones(len(y)), logit(prob)])
    eta = design @ np.array([a, b])
    mu = np.exp(-np.logaddexp(0.0, -eta))  # sigmoid without overflow
    return {"gradient": design.T @ (mu - y), "hessian": (design * (mu * (1 - mu))[:, None]).T @ design,
            "loss": float(np.sum(np.logaddexp(0.0, eta) - y * eta)), "n": len(y)}


def sum_recalibration_terms(replies: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Server: the pooled gradient (2,), Hessian (2, 2), loss and case count: sums, so exactly the pooled data's."""
    return (np.sum([np.asarray(r["gradient"], dtype=np.float64) for r in replies], axis=0),
            np.sum([np.asarray(r["hessian"], dtype=np.float64) for r in replies], axis=0),
            float(sum(float(r["loss"]) for r in replies)), int(sum(int(r["n"]) for r in replies)))


START = np.array([0.0, 1.0])  # (a, b) where every calibration fit starts: perfect calibration


def fit_recalibration(query: Callable[[np.ndarray], Sequence[Mapping[str, Any]]], fixed_slope: float | None = None,
                      tol: float = 1e-10, max_iter: int = 25, max_rounds: int | None = None) -> dict[str, Any]:
    """Server: Newton's method on the sites' summed :func:`site_recalibration_terms`, from (a, b) = (0, 1)
    (perfect calibration).

    ``query(params)`` sends params (2,) to every site and returns their replies. With ``fixed_slope`` (1.0:
    calibration-in-the-large) only the intercept is fitted, from the same replies' first components. A step that
    raises the loss is halved (each trial is one more round). Returns ``intercept``, ``slope``, their standard
    errors (``intercept_se``, ``slope_se``; 0 for a fixed slope) from the inverse Hessian, ``loss``, ``n``,
    ``rounds`` (queries sent, never more than ``max_rounds`` when given) and ``converged``. Without convergence
    (e.g. the pooled scores separate the classes, so no finite slope fits, or the round cap was reached) the last
    accepted point is returned with ``converged`` False.
    """
    free = [0] if fixed_slope is not None else [0, 1]
    params = START.copy() if fixed_slope is None else np.array([0.0, float(fixed_slope)])
    grad, hess, loss, n = sum_recalibration_terms(query(params))
    rounds, converged = 1, False
    for _ in range(max_iter):
        step = np.zeros(2)
        step[free] = np.linalg.solve(hess[np.ix_(free, free)], grad[free])
        if np.max(np.abs(step)) < tol:  # already within tol of the optimum: no round is spent to confirm it
            converged = True
            break
        scale = 1.0
        while rounds < (max_iter * 8 if max_rounds is None else max_rounds):
            trial = params - scale * step
            t_grad, t_hess, t_loss, _ = sum_recalibration_terms(query(trial))
            rounds += 1
            if t_loss <= loss + 1e-12 * abs(loss):
                break
            scale /= 2
        else:
            break
        params, grad, hess, loss = trial, t_grad, t_hess, t_loss
        if np.max(np.abs(scale * step)) < tol:
            converged = True
            break
    se = np.zeros(2)
    se[free] = np.sqrt(np.diag(np.linalg.inv(hess[np.ix_(free, free)])))
    return {"intercept": float(params[0]), "slope": float(params[1]), "intercept_se": float(se[0]),
            "slope_se": float(se[1]), "loss": loss, "n": n, "rounds": rounds, "converged": converged}


# ---------------------------------------------------------------- Brier score

def site_brier_terms(y: np.ndarray, prob: np.ndarray, k: int) -> dict[str, float]:
    """Site: ``sse`` (sum of (p - y)^2 over its >= k held-out cases) and ``n``."""
    y, prob = _check_site(y, prob, k)
    return {"sse": float(np.sum((prob - y) ** 2)), "n": len(y)}


def pooled_brier(replies: Sequence[Mapping[str, float]]) -> float:
    """Server: the pooled Brier score, total squared error over total cases (NaN with no cases)."""
    n = sum(float(r["n"]) for r in replies)
    return sum(float(r["sse"]) for r in replies) / n if n else float("nan")


# ---------------------------------------------------------------- decision curve

def decision_thresholds(count: int) -> np.ndarray:
    """(count,) the run's decision-curve thresholds j / (count + 1), j = 1..count: equal steps inside (0, 1)."""
    if count < 1:
        raise ValueError("at least one threshold")
    return np.arange(1, count + 1, dtype=np.float64) / (count + 1)


def _above(y: np.ndarray, prob: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(T, 2) [HGG, BM] cases with prob >= each threshold (called HGG, as ``metrics.confusion_counts``)."""
    called = prob[None, :] >= thresholds[:, None]
    return np.column_stack([(called & y).sum(axis=1), (called & ~y).sum(axis=1)]).astype(np.float64)


def _check_thresholds(thresholds: np.ndarray) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim != 1 or not len(t) or np.any(np.diff(t) <= 0) or t[0] <= 0 or t[-1] >= 1:
        raise ValueError("thresholds must increase strictly inside (0, 1)")
    return t


def k_safe_thresholds(y: np.ndarray, prob: np.ndarray, thresholds: np.ndarray, k: int,
                      per_class: bool = True) -> np.ndarray:
    """Site: (T,) bool, the thresholds at which the site may release its TP and FP counts.

    TP(t) counts the HGG cases with p >= t, FP(t) the BM cases. The called sets at increasing thresholds are
    nested, so any two released counts also release their difference: the cases between the thresholds. Along
    all cases -> kept thresholds in order -> none, every step (the cases leaving the called set between
    consecutive kept thresholds, those below the first, and those still called at the last) must hold 0 or >= k
    cases: of each class (``per_class``, the default: TP and FP are counts over one class each, as the release
    ledger counts class parts), or of both classes together (``per_class=False``: the rule of
    ``curves.roc_points`` and of the guard's cumulative count rule, under which a step's TP and FP are a statistic
    over the step's >= k cases). The steps are disjoint sets, each empty or of >= k cases, so any sum or
    difference of the released counts (and of the class totals the site sends anyway) covers >= k cases.
    Greedy from the lowest threshold; then the highest kept ones are dropped until its called set is 0 or >= k
    (dropping a threshold merges two steps, so the earlier ones stay valid). Not necessarily the largest such set.
    Which thresholds were withheld depends on the data: it says a step held 1 to k - 1 cases, never how many.
    """
    y, prob = _check_site(y, prob, k)
    t = _check_thresholds(thresholds)
    above = _above(y, prob, t)
    totals = np.array([y.sum(), (~y).sum()], dtype=np.float64)
    if not per_class:  # one column: the called cases of both classes
        above, totals = above.sum(axis=1, keepdims=True), totals.sum(keepdims=True)

    def fine(step: np.ndarray) -> bool:
        return bool(np.all((step == 0) | (step >= k)))

    kept = np.zeros(len(t), dtype=bool)
    last = totals
    for j in range(len(t)):
        if fine(last - above[j]):
            kept[j], last = True, above[j]
    while kept.any() and not fine(above[np.flatnonzero(kept)[-1]]):
        kept[np.flatnonzero(kept)[-1]] = False
    return kept


def site_decision_counts(y: np.ndarray, prob: np.ndarray, thresholds: np.ndarray, k: int,
                         per_class: bool = True) -> dict[str, np.ndarray]:
    """Site: counts for the decision curve at the server's thresholds (T,).

    Returns ``tp_fp`` (T, 2): [HGG, BM] cases with p >= t at each threshold :func:`k_safe_thresholds` keeps, 0 at
    the others; ``kept`` (T,) 1.0 / 0.0; ``n_pos_neg`` (2,): the site's HGG and BM cases. Between any two kept
    thresholds (and the class totals, and none), the counts change by 0 or >= k cases: per class, or in total
    with ``per_class=False``.
    """
    y, prob = _check_site(y, prob, k)
    t = _check_thresholds(thresholds)
    kept = k_safe_thresholds(y, prob, t, k, per_class)
    return {"tp_fp": _above(y, prob, t) * kept[:, None], "kept": kept.astype(np.float64),
            "n_pos_neg": np.array([y.sum(), (~y).sum()], dtype=np.float64)}


def _site_count_bounds(reply: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(T, 2) lower and upper bounds of one site's TP and FP at every threshold: exact where kept; between a
    withheld threshold's nearest kept neighbours otherwise (the counts never increase with the threshold), with
    the class totals below the lowest kept threshold and 0 above the highest."""
    counts = np.asarray(reply["tp_fp"], dtype=np.float64)
    kept = np.asarray(reply["kept"]).astype(bool)
    totals = np.asarray(reply["n_pos_neg"], dtype=np.float64)
    low, high = counts.copy(), counts.copy()
    idx = np.flatnonzero(kept)
    for j in np.flatnonzero(~kept):
        before, after = idx[idx < j], idx[idx > j]
        high[j] = counts[before[-1]] if len(before) else totals
        low[j] = counts[after[0]] if len(after) else 0.0
    return low, high


def pooled_net_benefit(replies: Sequence[Mapping[str, np.ndarray]], thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """Server: the decision curve of the pooled cases from every site's :func:`site_decision_counts`.

    NB(t) = TP/N - FP/N * t / (1 - t) with TP, FP summed over sites at t and N all their cases; treat all:
    prevalence - (1 - prevalence) * t / (1 - t); treat none: 0. Returns (T,) arrays ``threshold``, ``model`` (NaN
    where a withheld threshold leaves it undetermined), ``model_low`` / ``model_high`` (the range NB(t) lies in;
    equal to ``model`` where every site kept t), ``treat_all``, ``treat_none``.
    """
    t = _check_thresholds(thresholds)
    bounds = [_site_count_bounds(r) for r in replies]
    low = np.sum([lo for lo, _ in bounds], axis=0)
    high = np.sum([hi for _, hi in bounds], axis=0)
    n_pos, n_neg = np.sum([np.asarray(r["n_pos_neg"], dtype=np.float64) for r in replies], axis=0)
    n = n_pos + n_neg
    odds = t / (1 - t)
    exact = np.all(low == high, axis=1)
    model = np.where(exact, (low[:, 0] - low[:, 1] * odds) / n, np.nan)
    return {"threshold": t, "model": model,
            "model_low": (low[:, 0] - high[:, 1] * odds) / n, "model_high": (high[:, 0] - low[:, 1] * odds) / n,
            "treat_all": (n_pos - n_neg * odds) / n, "treat_none": np.zeros(len(t))}

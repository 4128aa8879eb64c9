"""Gradient-boosted trees grown from k-anonymous histograms (pure numpy; logistic loss, xgboost's split rule).

Every split threshold is one of the agreed bin edges: ``bins`` equal steps in z (the features standardised with
the cohort's pooled mean and std) over [-z_max, z_max], fixed by the run config, never a patient's value. A site
sends, per open node of the tree being grown, feature and bin, the sums of gradient, hessian and count of the rows
that fall there; the server sums them over sites, picks splits and leaf values (``TreeGrower``), one round trip
per tree level.

Rows are whatever the caller routes: for federated training the rows are a site's release blocks (k to 2k - 1
patients of one class), each routed whole by its block-mean z and weighted by its size (``block_rows``), so every
node, bin and leaf a site releases is a union of whole blocks (docs/privacy.md, section 1b). Prediction routes
each case by its own z (``predict_proba``).

The model is a flat dict of fixed-shape arrays (an ArrayRecord, a model file), R = rounds, N = 2^depth - 1
internal nodes and L = 2^depth leaves per tree in heap order (children of node i: 2i + 1, 2i + 2):

    mean, scale (s,)   pooled standardisation       edges (bins - 1,)   the agreed thresholds in z
    base (1,)          starting margin (logit)       trees (1,)          trees finished
    feature (R, N)     split feature, -1: no split (all rows go left)
    split (R, N)       split bin j: rows with bin <= j (z <= edges[j]) go left
    leaf (R, L)        leaf values, shrinkage included (a node that stopped early fills every leaf below it)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TIE = 1e-9  # relative: gains this close count as equal, and the first (feature, bin) in order wins


@dataclass(frozen=True)
class TreeParams:
    """Boosting settings (run config ``tree-*``): ``min_child_cases`` is on the pooled count of each child,
    ``min_child_hessian`` xgboost's ``min_child_weight``, ``l2`` its ``lambda``, ``learning_rate`` its ``eta``."""

    rounds: int = 20
    depth: int = 3
    bins: int = 16
    learning_rate: float = 0.3
    l2: float = 1.0
    min_child_cases: int = 10
    min_child_hessian: float = 1.0
    z_max: float = 3.0

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.depth < 1 or self.bins < 2:
            raise ValueError(f"trees need rounds >= 1, depth >= 1 and bins >= 2 (got {self.rounds}, {self.depth}, "
                             f"{self.bins}): raise tree-rounds, tree-depth or tree-bins")

    @property
    def open_nodes(self) -> int:
        """Most nodes open at one level (the deepest split level): the histograms' first dimension."""
        return 2 ** (self.depth - 1)


def z_edges(bins: int, z_max: float = 3.0) -> np.ndarray:
    """(bins - 1,) thresholds: equal steps in z over [-z_max, z_max]; bin j holds edges[j-1] < z <= edges[j]."""
    return np.linspace(-z_max, z_max, bins - 1)


def bin_of(z: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(n, s) int bin of each value of z (n, s): the number of edges below it (0 .. len(edges))."""
    return np.searchsorted(edges, z, side="left").astype(np.int64)


def standardise(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(n, s) z of x (n, s); a zero scale (a constant feature) keeps z = 0."""
    return (x - mean) / np.where(scale > 0, scale, 1.0)


def block_rows(z: np.ndarray, y: np.ndarray, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows for training from cases z (n, s), labels y (n,) and their release block ids (n,): per block its mean
    z (b, s), its label (b,) and its size (b,), blocks in sorted id order. A block must hold one class."""
    ids, inverse = np.unique(blocks, return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    means = np.stack([np.bincount(inverse, weights=z[:, j], minlength=len(ids)) for j in range(z.shape[1])],
                     axis=1) / sizes[:, None] if z.shape[1] else np.zeros((len(ids), 0))
    labels = np.bincount(inverse, weights=y, minlength=len(ids)) / sizes
    if np.any((labels != 0) & (labels != 1)):
        raise ValueError("a release block holds cases of both classes; blocks are cut per class (client.ledger)")
    return means, labels, sizes


def empty_model(params: TreeParams, mean: np.ndarray, scale: np.ndarray, base: float = 0.0) -> dict[str, np.ndarray]:
    """The encoding of an ensemble with no tree yet (shapes in the module docstring)."""
    n_internal, n_leaves = 2 ** params.depth - 1, 2 ** params.depth
    return {"mean": np.asarray(mean, dtype=np.float64).copy(), "scale": np.asarray(scale, dtype=np.float64).copy(),
            "edges": z_edges(params.bins, params.z_max), "base": np.array([base], dtype=np.float64),
            "trees": np.zeros(1), "feature": np.full((params.rounds, n_internal), -1.0),
            "split": np.full((params.rounds, n_internal), -1.0), "leaf": np.zeros((params.rounds, n_leaves))}


def _depth(arrays: dict[str, np.ndarray]) -> int:
    return int(np.log2(arrays["leaf"].shape[1]))


def route(arrays: dict[str, np.ndarray], tree: int, bins: np.ndarray, level: int) -> np.ndarray:
    """(n,) position (0 .. 2^level - 1) of each row at ``level`` of tree ``tree``, rows given by their bins (n, s)."""
    node = np.zeros(len(bins), dtype=np.int64)  # heap index
    feature, split = arrays["feature"][tree], arrays["split"][tree]
    for _ in range(level):
        f = feature[node].astype(np.int64)
        value = bins[np.arange(len(bins)), np.maximum(f, 0)] if bins.shape[1] else np.zeros(len(bins), np.int64)
        right = (f >= 0) & (value > split[node])
        node = 2 * node + 1 + right
    return node - (2 ** level - 1)


def margins(arrays: dict[str, np.ndarray], bins: np.ndarray, upto: int | None = None) -> np.ndarray:
    """(n,) margin (logit) of rows with bins (n, s): base plus the leaves of trees 0 .. upto - 1 (all finished)."""
    depth = _depth(arrays)
    upto = int(arrays["trees"][0]) if upto is None else upto
    out = np.full(len(bins), float(arrays["base"][0]))
    for t in range(upto):
        out += arrays["leaf"][t, route(arrays, t, bins, depth)]
    return out


def predict_proba(arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """(n,) probability of the positive class (HGG) for cases x (n, s) in the model's feature units."""
    z = standardise(np.asarray(x, dtype=np.float64), arrays["mean"], arrays["scale"])
    return 1.0 / (1.0 + np.exp(-margins(arrays, bin_of(z, arrays["edges"]))))


def histograms(arrays: dict[str, np.ndarray], bins: np.ndarray, y: np.ndarray, weight: np.ndarray,
               level: int, open_nodes: np.ndarray) -> dict[str, np.ndarray]:
    """One site's reply for one level of the tree being grown (tree ``arrays["trees"]``).

    Rows: bins (r, s), labels y (r,), weights (r,) (a block's size). Gradient and hessian of the logistic loss
    at the finished trees' margin. Returns ``grad``, ``hess``, ``count``, each (o, s, B) with o =
    len(open_nodes) (>= 2^level): sums of weight x gradient, weight x hessian and weight over the rows at each
    open node with each feature in each bin; rows of nodes not open (and beyond 2^level) stay 0."""
    o, s, n_bins = len(open_nodes), bins.shape[1], len(arrays["edges"]) + 1
    tree = int(arrays["trees"][0])
    p = 1.0 / (1.0 + np.exp(-margins(arrays, bins, tree)))
    grad, hess = weight * (p - y), weight * p * (1.0 - p)
    node = route(arrays, tree, bins, level)
    keep = open_nodes[node] > 0.5
    out = {key: np.zeros((o, s, n_bins)) for key in ("grad", "hess", "count")}
    for key, values in (("grad", grad), ("hess", hess), ("count", weight)):
        for j in range(s):
            index = node[keep] * n_bins + bins[keep, j]
            out[key][:, j, :] = np.bincount(index, weights=values[keep], minlength=o * n_bins).reshape(o, n_bins)
    return out


@dataclass(frozen=True)
class Split:
    feature: int  # -1: no allowed split
    bin: int
    gain: float


def best_splits(grad: np.ndarray, hess: np.ndarray, count: np.ndarray, params: TreeParams) -> list[Split]:
    """Per node of the summed histograms (o, s, B), the split of largest gain
    ½ [G_L²/(H_L + λ) + G_R²/(H_R + λ) - G²/(H + λ)] with both children holding >= ``min_child_cases`` and
    hessian >= ``min_child_hessian``; a positive gain only. Near-ties go to the first feature, then bin."""
    lam = params.l2
    gl, hl, cl = (np.cumsum(a, axis=2)[:, :, :-1] for a in (grad, hess, count))  # left = bins 0..j
    g, h, c = (a.sum(axis=2)[:, :1, None] for a in (grad, hess, count))  # node totals (same for every feature)
    gr, hr, cr = g - gl, h - hl, c - cl
    with np.errstate(divide="ignore", invalid="ignore"):  # empty children with lambda = 0: not allowed below
        gain = 0.5 * (gl ** 2 / (hl + lam) + gr ** 2 / (hr + lam) - g ** 2 / (h + lam))
    allowed = ((cl >= params.min_child_cases) & (cr >= params.min_child_cases)
               & (hl >= params.min_child_hessian) & (hr >= params.min_child_hessian))
    gain = np.where(allowed & np.isfinite(gain), gain, -np.inf)
    out = []
    for node in range(gain.shape[0]):
        flat = gain[node].ravel()
        best = flat.max() if flat.size else -np.inf
        if not np.isfinite(best) or best <= 0.0:
            out.append(Split(-1, -1, 0.0))
            continue
        first = int(np.flatnonzero(flat >= best - TIE * max(1.0, abs(best)))[0])
        feature, j = divmod(first, gain.shape[2])
        out.append(Split(feature, j, float(flat[first])))
    return out


class TreeGrower:
    """The server's side: which level of which tree to ask for, and what to make of the summed histograms.

    ``request()`` gives (level, open mask (o,)); ``update(grad, hess, count)`` takes the histograms summed over
    sites for that request; ``done`` when every tree is grown. ``arrays`` is the model so far."""

    def __init__(self, params: TreeParams, mean: np.ndarray, scale: np.ndarray, base: float = 0.0) -> None:
        self.params = params
        self.arrays = empty_model(params, mean, scale, base)
        self.level = 0
        self.open = np.zeros(params.open_nodes)
        self.open[0] = 1.0
        self.splits: list[list[Split]] = [[] for _ in range(params.rounds)]  # what each level decided, per tree

    @property
    def tree(self) -> int:
        return int(self.arrays["trees"][0])

    @property
    def done(self) -> bool:
        return self.tree >= self.params.rounds

    def request(self) -> tuple[int, np.ndarray]:
        return self.level, self.open.copy()

    def _leaf(self, node_heap: int, g: float, h: float) -> None:
        """Write a node's value -eta G / (H + lambda) into every leaf below it."""
        depth = self.params.depth
        level = int(np.floor(np.log2(node_heap + 1)))
        first = (node_heap - (2 ** level - 1)) * 2 ** (depth - level)
        value = -self.params.learning_rate * g / (h + self.params.l2)
        self.arrays["leaf"][self.tree, first:first + 2 ** (depth - level)] = value

    def update(self, grad: np.ndarray, hess: np.ndarray, count: np.ndarray) -> None:
        if self.done:
            raise RuntimeError("every tree is grown: nothing to update")
        params, t, level = self.params, self.tree, self.level
        splits = best_splits(grad, hess, count, params)
        nxt = np.zeros(params.open_nodes)
        for pos in np.flatnonzero(self.open > 0.5):
            heap = 2 ** level - 1 + int(pos)
            split = splits[pos]
            g, h = grad[pos, 0].sum(), hess[pos, 0].sum()
            self.splits[t].append(split)
            if split.feature < 0:
                self._leaf(heap, g, h)
                continue
            self.arrays["feature"][t, heap] = split.feature
            self.arrays["split"][t, heap] = split.bin
            left = slice(0, split.bin + 1)
            gl, hl = grad[pos, split.feature, left].sum(), hess[pos, split.feature, left].sum()
            if level + 1 == params.depth:  # children are leaves: their sums are known already
                self._leaf(2 * heap + 1, gl, hl)
                self._leaf(2 * heap + 2, g - gl, h - hl)
            else:
                nxt[2 * int(pos)] = nxt[2 * int(pos) + 1] = 1.0
        if nxt.any():
            self.level, self.open = level + 1, nxt
        else:  # the tree is finished
            self.arrays["trees"][0] = t + 1
            self.level, self.open = 0, np.zeros(params.open_nodes)
            self.open[0] = 1.0


def fit_rows(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], params: TreeParams, mean: np.ndarray,
             scale: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """Grow the ensemble in one process from several sites' rows [(bins (r, s), y (r,), weight (r,))], each
    level's histograms summed over sites exactly as the federation does. Returns (model arrays, round trips)."""
    grower = TreeGrower(params, mean, scale)
    trips = 0
    while not grower.done:
        level, open_nodes = grower.request()
        replies = [histograms(grower.arrays, b, y, w, level, open_nodes) for b, y, w in rows]
        grower.update(*(sum(r[key] for r in replies) for key in ("grad", "hess", "count")))
        trips += 1
    return grower.arrays, trips

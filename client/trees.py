"""A site's side of gradient-boosted trees (the ``gbt`` family): one level's histograms over whole release blocks.

The site never routes a patient on its own: it forms *routing units*, its training release blocks (k to 2k - 1
patients of one class, client.ledger), merged in the blocks' secret order when the run's k is above the site's own
until each unit holds >= k, and routes each unit whole by its mean z. Every node, every (node, feature, bin) cell
and every leaf is then a union of whole units, hence of whole blocks: the sets the handler declares to the release
ledger (and the ledger checks) never split a block, so no sum and no difference of sums covers fewer than k
patients (docs/privacy.md, section 1b).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from client.ledger import Blocking
from client.site import SiteError
from common import trees

MODEL_KEYS = ("mean", "scale", "edges", "base", "trees", "feature", "split", "leaf")


def routing_units(case_ids: Sequence[str], labels: np.ndarray, blocking: Blocking | None, k: int) -> np.ndarray:
    """(n,) unit id of each case: its release block, blocks of a class merged in id order (the keyed, secret order)
    until each unit holds >= k cases (a short last group joins the one before)."""
    if blocking is None:
        raise SiteError("this site has no release blocks for the run; restart the run")
    block_of = {c: b for b, (_, members) in blocking.blocks.items() for c in members}
    missing = [c for c in case_ids if c not in block_of]
    if missing:
        raise SiteError(f"{len(missing)} training case(s) belong to no release block; restart the run")
    unit_of: dict[str, str] = {}
    for label in (1, 0):
        ids = sorted({block_of[c] for c, y in zip(case_ids, labels, strict=True) if int(y) == label})
        size = {b: sum(block_of[c] == b for c in case_ids) for b in ids}
        groups: list[list[str]] = []
        for b in ids:
            if not groups or sum(size[g] for g in groups[-1]) >= k:
                groups.append([])
            groups[-1].append(b)
        if len(groups) > 1 and sum(size[g] for g in groups[-1]) < k:
            groups[-2].extend(groups.pop())
        unit_of.update({b: f"{label}:{i}" for i, group in enumerate(groups) for b in group})
    return np.array([unit_of[block_of[c]] for c in case_ids], dtype=object)


def check_model(arrays: Mapping[str, np.ndarray], params: trees.TreeParams, s: int) -> dict[str, np.ndarray]:
    """The server's model arrays, refused unless they hold the run's agreed edges and shapes (a threshold the site
    did not agree to could single out a patient's value)."""
    missing = [key for key in (*MODEL_KEYS, "open") if key not in arrays]
    if missing:
        raise SiteError(f"the trees message lacks {', '.join(missing)}; restart the run")
    model = {key: np.asarray(arrays[key], dtype=np.float64) for key in MODEL_KEYS}
    expected = trees.empty_model(params, np.zeros(s), np.ones(s))
    for key, want in expected.items():
        if model[key].shape != want.shape:
            raise SiteError(f"the trees message's {key} has shape {model[key].shape}, not {want.shape} (the run's "
                            "tree-rounds, tree-depth, tree-bins and model features); restart the run")
    if not np.array_equal(model["edges"], expected["edges"]):
        raise SiteError("the trees message's bin edges are not the run's agreed ones (tree-bins equal steps in z "
                        "over [-3, 3]); the site only splits at agreed edges")
    if np.asarray(arrays["open"]).shape != (params.open_nodes,):
        raise SiteError(f"the trees message's open-node mask is not of length {params.open_nodes}; restart the run")
    return model


def site_reply(x: np.ndarray, y: np.ndarray, case_ids: Sequence[str], units: np.ndarray,
               arrays: Mapping[str, np.ndarray], level: int, params: trees.TreeParams,
               ) -> tuple[dict[str, np.ndarray], dict[str, frozenset[str]]]:
    """One level's histograms (``grad``, ``hess``, ``count``, each (o, s, v)) over the training cases x (n, s),
    y (n,), routed by unit, and the case set behind every open node and every nonzero cell (``tree:n<node>``,
    ``tree:n<node>:f<feature>:b<bin>``), each a union of whole units, for the release ledger."""
    model = check_model(arrays, params, x.shape[1])
    if not 0 <= level < params.depth:
        raise SiteError(f"the trees message asks for level {level}; the run's trees have levels 0..{params.depth - 1}")
    open_nodes = np.asarray(arrays["open"], dtype=np.float64)
    z = trees.standardise(x, model["mean"], model["scale"])
    zu, yu, wu = trees.block_rows(z, y, units)
    bins = trees.bin_of(zu, model["edges"])
    sent = trees.histograms(model, bins, yu, wu, level, open_nodes)
    members: dict[str, list[str]] = {}
    for case, unit in zip(case_ids, units, strict=True):
        members.setdefault(str(unit), []).append(str(case))
    unit_names = sorted(members)  # block_rows orders units by sorted id, as here
    node = trees.route(model, int(model["trees"][0]), bins, level)
    sets: dict[str, frozenset[str]] = {}

    def add(name: str, rows: np.ndarray) -> None:
        cases = frozenset(c for r in np.flatnonzero(rows) for c in members[unit_names[r]])
        if cases:
            sets[name] = cases

    for pos in np.flatnonzero(open_nodes > 0.5):
        at = node == pos
        add(f"tree:n{pos}", at)
        for j in range(bins.shape[1]):
            for b in np.unique(bins[at, j]):
                add(f"tree:n{pos}:f{j}:b{b}", at & (bins[:, j] == b))
    return sent, sets

"""Cross-validation's out-of-fold scores at one site (``internal-validation = "cv"``): kept in the run's node state
as the cross-validation folds score their held-out cases, never sent; what leaves is computed from them over every
usable case (client.app's ``out_of_fold`` and ``compare_out_of_fold`` handlers).

Each fold's scores are one chunk kept by its hash (client.nodestate), the state listing the chunks' hashes: the
whole table in ``context.state`` grew with every fold and case (Flower ships the state with every message).

Every case is held out by exactly one fold per repeat, so for each family and repeat the site holds one score per
usable case: the one the model that did not train on that case gave it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from flwr.app import ConfigRecord

from client import compute
from client.nodestate import NodeState
from client.site import SiteError

STATE = "radfed-out-of-fold"  # "chunks": the hashes of each fold's scores (family, repeat, case id -> score), in order


def _every(node: NodeState) -> dict[str, dict[str, dict[str, float]]]:
    """family -> repeat -> case id -> score from the model of the fold that held it out (later chunks win)."""
    record = node.state.get(STATE)
    every: dict[str, dict[str, dict[str, float]]] = {}
    for digest in record["chunks"] if isinstance(record, ConfigRecord) else []:  # type: ignore[union-attr]
        chunk = json.loads(node.get(str(digest), "out-of-fold scores"))
        every.setdefault(chunk["family"], {}).setdefault(str(chunk["repeat"]), {}).update(chunk["scores"])
    return every


def keep(node: NodeState, family: str, repeat: int, case_ids: Sequence[str], prob: np.ndarray) -> None:
    """Remember the scores ``prob`` a fold of ``repeat`` gave its held-out ``case_ids`` under ``family``."""
    chunk = {"family": family, "repeat": repeat,
             "scores": {str(c): float(p) for c, p in zip(case_ids, prob, strict=True)}}
    record = node.state.get(STATE)
    chunks = [str(d) for d in record["chunks"]] if isinstance(record, ConfigRecord) else []  # type: ignore[union-attr]
    node.state[STATE] = ConfigRecord({"chunks": [*chunks, node.put(json.dumps(chunk, sort_keys=True).encode())]})


def scores(node: NodeState, family: str, case_ids: Sequence[str], repeats: Sequence[int]) -> np.ndarray:
    """(len(repeats), n): each case's out-of-fold score of ``family`` in each repeat; refuses when one is missing
    (a fold's evaluation did not reach this site, so some case has no score from a model that did not see it)."""
    kept = _every(node).get(family, {})
    missing = [c for r in repeats for c in case_ids if c not in kept.get(str(r), {})]
    if missing:
        raise SiteError(f"{len(missing)} out-of-fold score(s) of {family} are missing (this site missed a "
                        "cross-validation fold's evaluation); restart the run")
    return np.array([[kept[str(r)][c] for c in case_ids] for r in repeats], dtype=np.float64)


def mean_scores(node: NodeState, family: str, case_ids: Sequence[str], repeats: int) -> np.ndarray:
    """(n,): each case's out-of-fold score averaged over the repeats (the run's internal metrics score these)."""
    return scores(node, family, case_ids, range(repeats)).mean(axis=0)


def compare_reply(node: NodeState, families: Sequence[str], case_ids: Sequence[str], y: np.ndarray, repeat: int,
                  k: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The paired comparison of ``families`` over one repeat's out-of-fold scores of every usable case (``case_ids``
    with labels ``y``): AUCs, their paired DeLong covariance and the Brier sums (client.compute.compare_reply, which
    refuses a class of fewer than k cases)."""
    rows = np.vstack([scores(node, f, case_ids, [repeat]) for f in families])
    return compute.compare_reply(np.asarray(y), rows, k)

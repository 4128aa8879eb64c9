"""Cross-validation's out-of-fold scores at one site (``internal-validation = "cv"``): kept in the run's node state
as the cross-validation folds score their held-out cases, never sent; what leaves is computed from them over every
usable case (client.app's ``out_of_fold`` and ``compare_out_of_fold`` handlers).

Every case is held out by exactly one fold per repeat, so for each family and repeat the site holds one score per
usable case: the one the model that did not train on that case gave it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from client import compute
from client.site import SiteError

STATE = "radfed-out-of-fold"  # family -> repeat -> case id -> score from the model of the fold that held it out


def _every(state: RecordDict) -> dict[str, dict[str, dict[str, float]]]:
    record = state.get(STATE)
    return json.loads(str(record["scores"])) if isinstance(record, ConfigRecord) else {}


def keep(state: RecordDict, family: str, repeat: int, case_ids: Sequence[str], prob: np.ndarray) -> None:
    """Remember the scores ``prob`` a fold of ``repeat`` gave its held-out ``case_ids`` under ``family``."""
    every = _every(state)
    every.setdefault(family, {}).setdefault(str(repeat), {}).update(
        {str(c): float(p) for c, p in zip(case_ids, prob, strict=True)})
    state[STATE] = ConfigRecord({"scores": json.dumps(every)})


def scores(state: RecordDict, family: str, case_ids: Sequence[str], repeats: Sequence[int]) -> np.ndarray:
    """(len(repeats), n): each case's out-of-fold score of ``family`` in each repeat; refuses when one is missing
    (a fold's evaluation did not reach this site, so some case has no score from a model that did not see it)."""
    kept = _every(state).get(family, {})
    missing = [c for r in repeats for c in case_ids if c not in kept.get(str(r), {})]
    if missing:
        raise SiteError(f"{len(missing)} out-of-fold score(s) of {family} are missing (this site missed a "
                        "cross-validation fold's evaluation); restart the run")
    return np.array([[kept[str(r)][c] for c in case_ids] for r in repeats], dtype=np.float64)


def mean_scores(state: RecordDict, family: str, case_ids: Sequence[str], repeats: int) -> np.ndarray:
    """(n,): each case's out-of-fold score averaged over the repeats (the run's internal metrics score these)."""
    return scores(state, family, case_ids, range(repeats)).mean(axis=0)


def compare_reply(state: RecordDict, families: Sequence[str], case_ids: Sequence[str], y: np.ndarray, repeat: int,
                  k: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The paired comparison of ``families`` over one repeat's out-of-fold scores of every usable case (``case_ids``
    with labels ``y``): AUCs, their paired DeLong covariance and the Brier sums (client.compute.compare_reply, which
    refuses a class of fewer than k cases)."""
    rows = np.vstack([scores(state, f, case_ids, [repeat]) for f in families])
    return compute.compare_reply(np.asarray(y), rows, k)

"""A site's fitted ComBat parameters as its node keeps them for the run, one entry per cohort (the main run, each
fold): a short JSON header and the arrays as little-endian float64 bytes, kept by their hash (client.nodestate;
``context.state`` holds only the hash).

Why not the JSON of ``SiteCombat.to_dict`` (what the site's harmonisation file holds): at ~860 features writing it
took ~17 ms and reading it ~11 ms, once per fold at every site, i.e. n(n - 1) times in a leave-one-site-out run
(2,256 at 48 sites, in the moments round). The bytes round-trip every float64 exactly, so the harmonised features
are the same to the bit.

A leave-one-site-out fold's keep (``query.combat_keep``) holds the parameters of the features the fold harmonises
at the site alone (its chosen features, or its selection candidates when it asks the sites for their correlation;
the header lists their places): ~0.3 KB instead of 35 KB per fold, written once and read again by the site's
other simulated worker. A request for a column it does not hold is refused, in words.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord

from client.nodestate import NodeState
from client.site import SiteError
from common.combat import SiteCombat

# The parameters per cohort: their hash in the node's context.state, their bytes in client.nodestate. Flower's
# simulation ships a node's whole context to the worker and back with every message (Ray passes an argument above
# 100 KB through its object store: about 1.5 ms per round trip below, 7 ms above); the packed form is about 35 KB at
# 861 features, one per leave-one-site-out fold (1.6 MB at 48 sites), kept out of the context.
STATE = "radfed-combat"
_ARRAYS = ("grand_mean", "var_pooled", "gamma_star", "delta_star", "unadjusted")  # each (d,); beta_cov (p, d) last
_HEAD = 4  # bytes of the header's length


def _key(fold: str) -> str:
    return f"{STATE}:{fold}" if fold else STATE


def keep(node: NodeState, fold: str, params: SiteCombat, columns: list[int] | None = None) -> None:
    """Keep the cohort ``fold``'s parameters ("" = the main run) for the node's run: of ``columns`` alone (their
    places in the agreed list) when given, the only ones the cohort will harmonise here."""
    node.state[_key(fold)] = ConfigRecord({"params-sha256": node.put(pack(params, columns))})


def kept(node: NodeState, fold: str) -> Harmonizer | None:
    """The cohort ``fold``'s kept parameters as a Harmonizer, None when the node holds none."""
    record = node.state.get(_key(fold))
    if not isinstance(record, ConfigRecord):
        return None
    what = f"ComBat parameters of fold {fold}" if fold else "ComBat parameters"
    return Harmonizer(node.get(str(record["params-sha256"]), what))


def pack(params: SiteCombat, columns: list[int] | None = None) -> bytes:
    """``params`` as bytes (``unpack`` reads them back); of ``columns`` alone when given (the header lists them)."""
    picked = slice(None) if columns is None else list(columns)
    arrays = [np.asarray(getattr(params, k), dtype="<f8")[..., picked] for k in (*_ARRAYS, "beta_cov")]
    d, p = arrays[0].shape[0], params.beta_cov.shape[0]
    head = json.dumps({"site": params.site, "n": params.n, "parametric": params.parametric, "eb": params.eb,
                       "mean_only": params.mean_only, "d": d, "p": p, "columns": columns}).encode()
    body = np.concatenate([a.ravel() for a in arrays])
    return len(head).to_bytes(_HEAD, "big") + head + body.tobytes()


def _layout(blob: bytes) -> tuple[dict, np.ndarray]:
    """The header of ``pack``'s bytes and its numbers as a read-only (len(_ARRAYS) + p, d) view, one row per array
    (beta_cov's p rows last); refuses bytes that do not hold the header's numbers."""
    size = int.from_bytes(blob[:_HEAD], "big")
    head = json.loads(blob[_HEAD:_HEAD + size])
    d, p = int(head["d"]), int(head["p"])
    body = np.frombuffer(blob, dtype="<f8", offset=_HEAD + size)
    if body.shape[0] != (len(_ARRAYS) + p) * d:
        raise ValueError(f"the site's kept ComBat parameters hold {body.shape[0]} numbers, not "
                         f"{(len(_ARRAYS) + p) * d}: restart the run")
    return head, body.reshape(len(_ARRAYS) + p, d)


def _params(head: dict, rows: np.ndarray) -> SiteCombat:
    """The parameters from their header and their (len(_ARRAYS) + p, k) rows (each array copied: its own memory)."""
    parts = {k: rows[j].copy() for j, k in enumerate(_ARRAYS)}
    return SiteCombat(site=None if head["site"] is None else int(head["site"]), n=int(head["n"]),
                      parametric=bool(head["parametric"]), eb=bool(head["eb"]), mean_only=bool(head["mean_only"]),
                      grand_mean=parts["grand_mean"], var_pooled=parts["var_pooled"],
                      gamma_star=parts["gamma_star"], delta_star=parts["delta_star"],
                      unadjusted=parts["unadjusted"].astype(bool), beta_cov=rows[len(_ARRAYS):].copy())


@functools.lru_cache(maxsize=256)
def unpack(blob: bytes) -> SiteCombat:
    """The parameters ``pack`` wrote; each fold's are read once per process, not per message."""
    head, rows = _layout(blob)
    return _params(head, rows)


class Harmonizer:
    """A cohort's ComBat adjustment at the site (client.steps.site_matrix): ``(x, covariates)`` over every agreed
    radiomics feature, or ``restrict(columns)`` for only those columns of the agreed list. ComBat adjusts each
    feature on its own, so adjusting the few columns a message uses (a model's inputs, the correlation's
    candidates) gives the same numbers as adjusting all ~860 and picking them after (0.4 ms less per message)."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def __call__(self, x: np.ndarray, covariates: np.ndarray | None) -> np.ndarray:
        if _layout(self.blob)[0].get("columns") is not None:
            raise SiteError("this site kept the cohort's ComBat parameters for the model's features only, and this "
                            "request needs them all; restart the run")
        return unpack(self.blob).apply(x, covariates)

    def restrict(self, columns: tuple[int, ...]) -> Callable[[np.ndarray, np.ndarray | None], np.ndarray]:
        return _columns(self.blob, columns).apply


@functools.lru_cache(maxsize=1024)
def _columns(blob: bytes, columns: tuple[int, ...]) -> SiteCombat:
    """The parameters of ``columns`` only (a fold's model inputs: one entry per fold and input list), picked from the
    bytes: a site's process serves ~2,300 folds' parameters (48 sites x 47 folds), more than ``unpack`` keeps, and
    unpacking all ~860 columns to keep three was most of a fold's first Newton request at the site. The same numbers
    as ``unpack(blob)``'s columns."""
    head, rows = _layout(blob)
    held = head.get("columns")
    if held is not None:  # kept for some columns only: each asked one by its place among them
        place = {c: i for i, c in enumerate(held)}
        missing = [c for c in columns if c not in place]
        if missing:
            raise SiteError(f"this site kept the cohort's ComBat parameters for the model's features only, not for "
                            f"{len(missing)} feature(s) this request needs; restart the run")
        columns = tuple(place[c] for c in columns)
    return _params(head, rows[:, list(columns)])

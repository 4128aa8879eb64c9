"""The matrices a site's handlers compute on (client.compute): one split's features, harmonised with a cohort's
ComBat parameters, in the columns a message names; and the name lists every fold's message repeats.

Kept between messages (in the node's process only, never written or sent): in a leave-one-site-out run a site
answers the same fold's Newton rounds again and again, each on the same harmonised model inputs, and every fold's
moments request reads the same raw training matrix. A matrix is remembered under exactly what makes it: the loaded
feature table (the object: a site read again after a file changed is a new table, so an entry made before never
serves it), the split's rows, the column names, and the cohort's ComBat parameters as the bytes the node keeps
(client.combat_state). Each call returns a fresh copy, so what a caller does to it never reaches the next one.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

import numpy as np

from client import runcache
from client.site import SiteError
from common import covariates as cov
from common.canon import sha256_json
from common.moments import site_moments

if TYPE_CHECKING:
    from client.steps import SiteData

Harmonizer = Callable[[np.ndarray, np.ndarray | None], np.ndarray]  # (x (n, d), covariates (n, p)) -> (n, d)

# what is kept: at most this many matrices (48 sites x 47 folds x a few column lists in one simulated node's
# process), of at most MAX_COLUMNS columns when harmonised (a fold's model inputs, its selection candidates: a few KB
# each); a raw matrix (no ComBat: the same for every fold) whatever its width, one per site and split
MAX_ENTRIES = 8192
MAX_COLUMNS = 64
_KEPT: OrderedDict[Hashable, tuple[tuple[object, ...], np.ndarray, np.ndarray]] = OrderedDict()
_LOCK = threading.Lock()
counts = {"made": 0, "reused": 0}  # for tests and benches: how often a matrix was computed or served from memory


def site_matrix(data: SiteData, agreed: list[str], held_out: bool | None, names: list[str] | None = None,
                harmonize: Harmonizer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one split (``held_out`` True/False; None: every usable case): x (n, len(names)) after
    harmonising all ``agreed`` features, y (n,).

    Harmonisation (the site's own ComBat parameters) is fitted on the whole agreed feature list; a harmoniser
    with ``restrict`` (client.combat_state.Harmonizer) adjusts only the columns ``names`` picks, any other all of
    them before the columns are picked. ``names`` defaults to ``agreed``. Remembered when the harmoniser is none
    or the node's kept ComBat parameters (``blob``), see the module's docstring.
    """
    key = _key(data, agreed, held_out, names, harmonize)
    if key is not None:
        with _LOCK:
            kept = _KEPT.get(key)
            if kept is not None and all(a is b for a, b in zip(kept[0], _made_from(data), strict=True)):
                _KEPT.move_to_end(key)
                counts["reused"] += 1
                return kept[1].copy(), kept[2].copy()
    x, y = _matrix(data, agreed, held_out, names, harmonize)
    counts["made"] += 1
    if key is not None and (harmonize is None or x.shape[1] <= MAX_COLUMNS):
        with _LOCK:
            _KEPT[key] = (_made_from(data), x.copy(), y.copy())  # kept too: their ids are not reused meanwhile
            while len(_KEPT) > MAX_ENTRIES:
                _KEPT.popitem(last=False)
    return x, y


def _key(data: SiteData, agreed: list[str], held_out: bool | None, names: list[str] | None,
         harmonize: Harmonizer | None) -> Hashable | None:
    """What the matrix is a function of, or None when it cannot be named (a harmoniser other than the node's kept
    parameters, e.g. a test's function)."""
    blob = getattr(harmonize, "blob", None)
    if harmonize is not None and not isinstance(blob, bytes):
        return None
    return (id(data.table), data.held_out.tobytes(), held_out, tuple(agreed), None if names is None else tuple(names),
            blob, data.clinical_names)


def _made_from(data: SiteData) -> tuple[object, ...]:
    """The loaded arrays a matrix is read from (a kept one serves only these very objects)."""
    return data.table, data.covariates, data.clinical


def training_moments(data: SiteData, agreed: list[str]) -> tuple[int, np.ndarray, np.ndarray]:
    """The training split's count, mean (d,) and centred sum of squares (d,) of the agreed radiomics features before
    ComBat: the same for each of a batch's ``query.combat_keep`` requests (one per fold the site trains in), so
    worked out once per look (client.runcache), read-only."""
    def make() -> tuple[int, np.ndarray, np.ndarray]:
        n, mean, m2 = site_moments(site_matrix(data, radiomics_names(agreed), held_out=False)[0])
        mean.flags.writeable = m2.flags.writeable = False
        return n, mean, m2

    return runcache.in_look(("training-moments", tuple(agreed)), data, make)


def forget() -> None:
    """Drop every kept matrix (tests, benches)."""
    with _LOCK:
        _KEPT.clear()


def _matrix(data: SiteData, agreed: list[str], held_out: bool | None, names: list[str] | None,
            harmonize: Harmonizer | None) -> tuple[np.ndarray, np.ndarray]:
    rows = np.ones_like(data.held_out) if held_out is None else data.held_out if held_out else ~data.held_out
    radiomics, index = _radiomics(tuple(agreed))
    wanted = agreed if names is None else names
    restrict = getattr(harmonize, "restrict", None)  # one that adjusts single columns: only the wanted ones
    if restrict is not None and names is not None:
        picked = [n for n in wanted if n in index]
        x = data.table.columns(picked)[rows]
        x = restrict(tuple(index[n] for n in picked))(x, None if data.covariates is None else data.covariates[rows])
        index = {n: j for j, n in enumerate(picked)}
        radiomics = picked
    elif harmonize is not None:  # from the raw matrix kept for the split (each fold's moments request adjusts it)
        raw, _ = site_matrix(data, radiomics, held_out)
        x = harmonize(raw, None if data.covariates is None else data.covariates[rows])
    else:
        x = data.table.columns(radiomics)[rows]
    if wanted == radiomics:
        return x, data.table.labels[rows]
    # clinical inputs (model-covariates) join after ComBat, which never adjusts them, as they were coded
    clinical = {n: j for j, n in enumerate(data.clinical_names)}
    missing = [n for n in wanted if n not in index and n not in clinical]
    if missing:
        raise SiteError(f"the server asked for input(s) {', '.join(missing)}, which this site does not have in this "
                        "run (model-covariates differs between the sides?); restart the run")
    out = np.empty((int(rows.sum()), len(wanted)))
    for j, n in enumerate(wanted):
        out[:, j] = x[:, index[n]] if n in index else data.clinical[rows, clinical[n]]  # type: ignore[index]
    return out, data.table.labels[rows]


@functools.lru_cache(maxsize=256)
def _radiomics(agreed: tuple[str, ...]) -> tuple[list[str], dict[str, int]]:
    """The agreed radiomics features (not the clinical inputs) and each one's place: every message of a fold asks
    with the same ~1,000 names, so they are sorted out once."""
    radiomics = [n for n in agreed if not cov.is_clinical(n)]
    return radiomics, {n: i for i, n in enumerate(radiomics)}


# A name list a message carries is the same in every fold's message (the ~860 agreed features in each of a 48-site
# batch's 47 moments requests): its hash and its radiomics part are worked out once per distinct list (keyed by the
# whole list, so equal content gives the same answer as computing it again: 1.1 ms and 0.4 ms per request before).
def radiomics_names(names: list[str]) -> list[str]:
    """``names`` without the clinical inputs (model-covariates), in order (a new list the caller may keep)."""
    return list(_radiomics(tuple(names))[0])


def radiomics_columns(agreed: list[str], names: object) -> list[int] | None:
    """Each of ``names`` (a list the server sent, or None) by its place among the ``agreed`` radiomics features, the
    columns ComBat's parameters are fitted over; None for None. Refuses a name outside them."""
    if names is None:
        return None
    _, index = _radiomics(tuple(agreed))
    wanted = [str(n) for n in names]  # type: ignore[attr-defined]
    unknown = [n for n in wanted if n not in index]
    if unknown:
        raise SiteError(f"the server asked this site to keep ComBat parameters for {len(unknown)} feature(s) it did "
                        f"not agree for the cohort (e.g. {unknown[0]}); restart the run")
    return [index[n] for n in wanted]


def has_clinical(names: list[str]) -> bool:
    """Whether ``names`` holds a clinical input (model-covariates)."""
    return len(_radiomics(tuple(names))[0]) != len(names)


@functools.lru_cache(maxsize=256)
def _names_sha256(names: tuple[str, ...]) -> str:
    return sha256_json(list(names))


def names_sha256(names: list[str]) -> str:
    """``common.canon.sha256_json(names)`` of a name list, computed once per distinct list."""
    return _names_sha256(tuple(names))

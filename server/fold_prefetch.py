"""The leave-one-site-out folds' first steps, worked out while the main run still waits for its sites.

A fold without ComBat covariates begins with the coordinator alone: its sites' feature agreement, their main-run
ComBat sums pooled again (server.harmonization ``pool_again``), each site's ComBat fit for the fold and its moments
worked out from them (server.derived_moments). That is ~35 ms of the coordinator's CPU per fold, one fold after
another (the folds take turns) while every site waits: 1.7 s at 48 sites, the folds' whole first stretch. None of it
reads anything the main run does after its moments phase, and the coordinator spends most of the rest of the main
run waiting for replies. So from then on a thread works it out, fold by fold in fold order, at the lowest CPU
priority (the sites' simulated workers and the coordinator's own threads come first); each fold takes what is ready
when it starts and works out the rest itself, as before. Never waited for: a fold the thread has not reached is
left to the fold (the thread skips it), and only the fold the thread is on at that moment waits for it to finish.

Nothing is sent or learnt that was not before; the values are pure functions of the same numbers, so the fold's
pooled estimates, fits and moments are the same to the bit whoever works them out (tests/test_fold_prefetch.py), and
the fold writes its audit entries in its own turn as before (its ``harmonization`` entry notes ``ahead``).

What it buys depends on where the sites run. Deployed, they answer on their own machines and the coordinator's CPU
is idle while it waits, so the folds' first stretch simply goes. In the simulation on a 2-core machine the sites'
workers and the coordinator share the same cores: the folds' first stretch goes (1.6 s to 0.5 s at 48 sites), but the
main run takes about as much longer, so the run's wall time is about the same (docs/performance.md, stop 39).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field

from server.derived_moments import FoldDerivation, wanted
from server.federation import Cohort, FeatureAgreement, Run
from server.harmonization import Harmonization, Pooled, design_order, pool_again, reusable
from server.phases import PooledMoments

log = logging.getLogger("flwr.radfed.server")
NICENESS = 19  # the thread's: below the coordinator's other threads (0) and Ray's workers (15)


@dataclass
class FoldStart:
    """A fold's first steps: its sites' feature agreement, their ComBat pooled again and its moments worked out
    (``pooled`` and ``derivation`` None when the fold asks its sites instead: a different feature list)."""

    others: frozenset[str]
    agreement: FeatureAgreement
    pooled: Pooled | None = None
    derivation: FoldDerivation | None = None


@dataclass
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    start: FoldStart | None = None
    taken: bool = False


def prepare(run: Run, main: Cohort, held: str, harmonization: Harmonization, moments: PooledMoments) -> FoldStart:
    """The first steps of the fold that holds out ``held``, from the main run's cohort, ComBat and moments: what
    server.validation and server.pipeline would work out at the fold's start."""
    others = frozenset(name for name in main.fed.sites.values() if name != held)
    agreement = main.agreement.restricted(set(others))
    fold = Cohort(main.fed.subset(set(others)), agreement, fold=held)
    start = FoldStart(others, agreement)
    if not wanted(run, fold) or not reusable(harmonization, fold, ""):
        return start  # the fold asks its sites for its ComBat or its moments: nothing more ahead
    start.pooled = pool_again(harmonization.sums, tuple(fold.fed.sites[nid] for nid in design_order(fold)))
    derivation = FoldDerivation(run, fold, start.pooled.estimates, harmonization, moments, None)
    for site in derivation.sites:
        derivation.moments(site)
        time.sleep(0)  # hands the interpreter to the coordinator's other threads between sites
    start.derivation = derivation
    return start


class FoldPrefetch:
    """Every leave-one-site-out fold's first steps (``prepare``), worked out in a thread from ``start()`` on; a fold
    ``take``s its own."""

    def __init__(self, run: Run, main: Cohort, harmonization: Harmonization, moments: PooledMoments) -> None:
        self._run, self._main, self._harmonization, self._moments = run, main, harmonization, moments
        self._slots = {name: _Slot() for name in sorted(main.fed.sites.values())}  # fold order (server.validation)
        self._thread = threading.Thread(target=self._work, name="fold-prefetch", daemon=True)

    def start(self) -> FoldPrefetch:
        self._thread.start()
        return self

    def take(self, held: str, agreement: FeatureAgreement, others: set[str]) -> FoldStart | None:
        """The first steps of the fold holding out ``held`` if they are ready (waiting only while the thread is on
        this very fold), for ``agreement`` (the main run's) and the fold's sites ``others``; else None, and the thread
        leaves that fold to its caller. Each fold's once (the fold holds them from then on)."""
        slot = self._slots.get(held)
        if slot is None or agreement is not self._main.agreement:
            return None
        with slot.lock:
            start, slot.start, slot.taken = slot.start, None, True
        return start if start is not None and start.others == others else None

    def _work(self) -> None:
        with suppress(AttributeError, OSError):  # this thread only (Linux: setpriority takes a thread's id)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
        for held, slot in self._slots.items():
            with slot.lock:
                if slot.taken:
                    continue
                try:
                    slot.start = prepare(self._run, self._main, held, self._harmonization, self._moments)
                except Exception as exc:  # noqa: BLE001  # the fold then works it out itself, and fails in its turn
                    log.debug("fold %s not worked out ahead: %s", held, exc)

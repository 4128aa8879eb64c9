"""Biological covariates for ComBat (e.g. age, sex): the federation-wide spec and how a site codes its values.

The run config names them once for every site, ``combat-covariates = "age,sex=F|M"``: a bare name is
continuous (a number per case), ``name=L1|L2|...`` is categorical with the agreed levels. Values come from
the site's own manifest (an extra column per covariate) and never leave the site; only the ComBat
cross-products over at least k cases do.

Coding equals neuroCombat's design (see common.combat): categorical covariates first, then continuous ones,
each in the order given; a categorical one with sorted levels L1 < ... < Lm becomes m - 1 indicator columns
for L2..Lm (L1 is the reference).

The diagnosis is refused as a covariate: it is unknown when a new case is predicted, and adjusting for it
writes the label into the features the model learns from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_FORBIDDEN = {"diagnosis", "label", "case_id", "mask"}


class CovariateError(ValueError):
    """A malformed covariate spec; the message names the entry and the fix."""


@dataclass(frozen=True)
class Covariate:
    name: str
    levels: tuple[str, ...] = ()  # sorted; empty for a continuous covariate

    @property
    def categorical(self) -> bool:
        return bool(self.levels)

    @property
    def columns(self) -> list[str]:
        """Names of this covariate's design columns."""
        return [f"{self.name}={level}" for level in self.levels[1:]] if self.categorical else [self.name]

    def code(self, raw: str) -> list[float]:
        """One case's value (as written in the manifest) -> its design columns; ValueError says why not."""
        value = raw.strip()
        if not value:
            raise ValueError(f"no {self.name} value")
        if self.categorical:
            if value not in self.levels:
                raise ValueError(f"{self.name} {value!r} is not one of the agreed levels {'|'.join(self.levels)}")
            return [float(value == level) for level in self.levels[1:]]
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{self.name} {value!r} is not a number") from None
        if not np.isfinite(number):
            raise ValueError(f"{self.name} {value!r} is not a finite number")
        return [number]


def parse(spec: str, knob: str = "combat-covariates") -> list[Covariate]:
    """``"age,sex=F|M"`` -> covariates in design order (categorical first, then continuous); ``""`` -> [].
    ``knob`` names the run-config key in error messages (``combat-covariates`` or ``model-covariates``)."""
    found: list[Covariate] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        name, _, levels_text = entry.partition("=")
        name = name.strip()
        if not _NAME.match(name):
            raise CovariateError(f"{knob} entry {entry!r}: a covariate name is letters, digits, '_', "
                                 "'.', '-' and starts with a letter, e.g. \"age,sex=F|M\"")
        if name.lower() in _FORBIDDEN:
            raise CovariateError(f"{knob}: {name!r} cannot be a covariate; the diagnosis is unknown when a new "
                                 "case is predicted and would leak the label into the model")
        levels: tuple[str, ...] = ()
        if levels_text.strip():
            raw_levels = [level.strip() for level in levels_text.split("|")]
            levels = tuple(sorted(set(raw_levels)))
            if "" in levels or len(levels) < 2 or len(levels) != len(raw_levels):
                raise CovariateError(f"{knob} entry {entry!r}: list two or more distinct, non-empty "
                                     "levels separated by '|', e.g. sex=F|M")
        elif "=" in entry:
            raise CovariateError(f"{knob} entry {entry!r}: give the levels after '=', e.g. sex=F|M, or "
                                 "drop '=' for a continuous covariate")
        if any(c.name == name for c in found):
            raise CovariateError(f"{knob} names {name!r} twice")
        found.append(Covariate(name, levels))
    return [c for c in found if c.categorical] + [c for c in found if not c.categorical]


def describe(covariates: Sequence[Covariate]) -> str:
    """The canonical spec text (design order, sorted levels): what a site stores beside its parameters."""
    return ",".join(f"{c.name}={'|'.join(c.levels)}" if c.categorical else c.name for c in covariates)


def columns(covariates: Sequence[Covariate]) -> list[str]:
    """All design column names, in order: p of them."""
    return [col for c in covariates for col in c.columns]


CLINICAL = "clinical/"  # prefix of a model covariate's input column (e.g. clinical/age, clinical/sex=M)


def clinical_columns(covariates: Sequence[Covariate]) -> list[str]:
    """The model's input columns of the ``model-covariates`` (same coding as ComBat's design, prefixed)."""
    return [CLINICAL + col for col in columns(covariates)]


def is_clinical(name: str) -> bool:
    return name.startswith(CLINICAL)


def code_case(covariates: Sequence[Covariate], values: Mapping[str, str]) -> np.ndarray:
    """One case's raw values (manifest columns) -> (p,) design row; ValueError names every bad covariate."""
    row: list[float] = []
    problems = []
    for c in covariates:
        try:
            row += c.code(values.get(c.name, ""))
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    return np.asarray(row, dtype=np.float64)


def level_labels(covariates: Sequence[Covariate], design: np.ndarray) -> list[np.ndarray]:
    """Per categorical covariate, each case's level as text (e.g. "sex=F"), decoded from the design (n, p)."""
    labels: list[np.ndarray] = []
    start = 0
    for c in covariates:
        width = len(c.columns)
        if c.categorical:
            block = design[:, start:start + width]
            level = np.where(block.any(axis=1), block.argmax(axis=1) + 1, 0)
            labels.append(np.array([f"{c.name}={c.levels[i]}" for i in level], dtype=object))
        start += width
    return labels


def level_groups(covariates: Sequence[Covariate], design: np.ndarray) -> dict[str, np.ndarray]:
    """Each categorical level present -> (n,) bool of its cases: the groups XᵀY sums features over."""
    return {str(level): column == level for column in level_labels(covariates, design) for level in np.unique(column)}


def small_groups(covariates: Sequence[Covariate], design: np.ndarray, k: int) -> list[str]:
    """Groups of cases, defined by categorical levels, with 1 to k - 1 cases (an absent level is no group).

    XᵀX holds every level's count and XᵀY/XᵀX the sums of features and continuous covariates per level, so
    each level is a group the ComBat messages aggregate over; with two categorical covariates the pairs of
    levels are too (their cross-product counts). Returns e.g. ``["sex=F (3 cases)"]``; [] when all hold k.
    """
    labels = level_labels(covariates, design)
    groups = [[(c,) for c in col] for col in labels]
    groups += [list(zip(a, b, strict=True)) for i, a in enumerate(labels) for b in labels[i + 1:]]
    small = []
    for column in groups:
        values, counts = np.unique(np.array([" & ".join(g) for g in column], dtype=object), return_counts=True)
        small += [f"{v} ({n} case{'s' if n != 1 else ''})" for v, n in zip(values, counts, strict=True) if n < k]
    return small

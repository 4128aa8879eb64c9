"""Why a logistic model scored a case as it did: per-feature contributions, drivers and plain words.

Pure numpy and python, no I/O. The model (``common.model``) computes ``logit = w . z + b`` with
``z = (x - mean) / scale`` the harmonised features standardised with the federation's pooled mean and std;
each feature's contribution ``w_j * z_j`` is its share of the log-odds, so the contributions plus the
intercept are the logit exactly. The probability itself is the model's (``common.model.predict_proba``);
``leans_towards`` reads it at the federation's threshold. Feature ids are the extractor's
``<sequence>/<region>/<imagetype>_<class>_<name>`` (``shape/<region>/...`` for shape features); ``feature_words``
and ``describe`` turn them into plain words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

THRESHOLD = 0.5  # the federation's metrics count a case as HGG at probability >= 0.5


@dataclass
class Contribution:
    """One model feature's part in one case's log-odds."""

    feature: str
    weight: float
    value: float  # harmonised
    z: float  # (value - pooled mean) / pooled std
    contribution: float  # weight * z

    @property
    def towards(self) -> str:
        return "HGG" if self.contribution > 0 else "BM" if self.contribution < 0 else "neither"

    def words(self) -> str:
        return describe(self.feature, self.z, self.contribution)

    def as_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "words": self.words(), "weight": self.weight, "value": self.value,
                "z": self.z, "contribution": self.contribution, "towards": self.towards}


def explain(names: Sequence[str], x: np.ndarray, mean: np.ndarray, scale: np.ndarray, weights: np.ndarray,
            intercept: float) -> tuple[float, list[Contribution]]:
    """(logit, contributions in model order) of one case.

    ``names``: the model's s features; ``x``: the case's harmonised values (s,); ``mean``, ``scale``: the
    model's standardisation (s,); ``weights``: its coefficients (s,); ``intercept``: its bias.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    z = (x - np.asarray(mean, dtype=np.float64)) / np.asarray(scale, dtype=np.float64)
    if not len(names) == x.shape[0] == w.shape[0] == z.shape[0]:
        raise ValueError(f"{len(names)} names for {x.shape[0]} values, {w.shape[0]} weights, {z.shape[0]} z-scores")
    contributions = [Contribution(n, float(w[j]), float(x[j]), float(z[j]), float(w[j] * z[j]))
                     for j, n in enumerate(names)]
    return float(np.sum(w * z) + intercept), contributions


def drivers(contributions: Sequence[Contribution], top: int) -> list[Contribution]:
    """The ``top`` contributions largest in absolute value (ties by feature name)."""
    ranked = sorted(contributions, key=lambda c: (-abs(c.contribution), c.feature))
    return ranked[:max(top, 0)]


def leans_towards(probability: float) -> str:
    """The class a probability of HGG points to at the federation's threshold."""
    return "HGG" if probability >= THRESHOLD else "BM"


_SEQUENCES = {"t1c": "T1c", "flair": "FLAIR", "adc": "ADC", "t1": "T1", "t2": "T2"}
_REGIONS = {"enhancing": "the enhancing tumour", "necrosis": "the necrosis", "edema": "the peritumoral edema"}
_CLASSES = {"firstorder": "intensity", "glcm": "GLCM texture", "glrlm": "run-length texture",
            "glszm": "size-zone texture", "gldm": "grey-level dependence texture",
            "ngtdm": "neighbourhood-difference texture", "shape": "shape"}
_FEATURES = {"10Percentile": "10th percentile", "90Percentile": "90th percentile", "Idm": "inverse difference moment",
             "Idmn": "normalised inverse difference moment", "Id": "inverse difference",
             "Idn": "normalised inverse difference", "Imc1": "informational measure of correlation 1",
             "Imc2": "informational measure of correlation 2", "MCC": "maximal correlation coefficient"}


def feature_words(feature: str) -> str:
    """A feature id in plain words, e.g. ``t1c/enhancing/original_firstorder_Mean`` -> "mean (intensity) of the
    enhancing tumour on T1c"; an id of another form is returned as it is."""
    if feature.startswith("clinical/"):  # a model covariate: clinical/age, clinical/sex=M
        name, _, level = feature.removeprefix("clinical/").partition("=")
        return f"{name} (clinical){f', {level} rather than the reference level' if level else ''}"
    parts = feature.split("/")
    if len(parts) != 3:
        return feature
    seq, region, key = parts
    bits = key.split("_")
    image_type, klass, name = (bits[0], bits[1], "_".join(bits[2:])) if len(bits) >= 3 else ("original", "", key)
    words = _FEATURES.get(name) or re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).lower()
    kind = _CLASSES.get(klass, klass)
    region_words = _REGIONS.get(region, region)
    filtered = "" if image_type == "original" else f", {image_type} filtered"
    return (f"{words} ({kind}) of {region_words}" if seq == "shape" else
            f"{words} ({kind}{filtered}) of {region_words} on {_SEQUENCES.get(seq, seq)}")


def describe(feature: str, z: float, contribution: float) -> str:
    """A feature's part in the result, in plain words."""
    if abs(z) < 0.05:
        level = f"is about the federation's average (z = {z:+.2f})"
    else:
        level = f"is {'higher' if z > 0 else 'lower'} than the federation's average (z = {z:+.2f})"
    if contribution > 0:
        effect = "which points to HGG"
    elif contribution < 0:
        effect = "which points to BM"
    else:
        effect = "which the model does not weigh"
    return f"{feature_words(feature)} {level}, {effect}"


"""Differential privacy for radfed: the Gaussian mechanism and its zero-concentrated DP accounting.

Pure numpy, no Flower. Two uses:

* **Model updates** (FedAvg ``train`` replies; wired by ``client.dp.dp_update_mod``): a site clips the L2
  norm of its update ``local - global`` over all trainable arrays together to ``clip_norm`` (C) and adds
  Gaussian noise of std ``sigma = noise_multiplier * C`` to every trainable entry, before the reply
  leaves the site. Buffers (the model's ``mean``/``scale``) are the server's own values sent back
  unchanged; they are never noised and must not differ from what the site received.
* **Summary statistics** (``privatize_sum``): sums over cases of features clipped to ``[-c, c]``
  after standardisation, and counts. Not wired yet; for later phases.

Unit of privacy for model updates: the **site** in one round. The clipped update of a site lies in
the L2 ball of radius C whatever its data, so one noisy update is a Gaussian release with

* sensitivity C against "the site trained on nothing" (an update of zero: the site's whole
  contribution to the round present or absent) — the site-level relation of client-level DP in
  federated learning (McMahan et al. 2018; what Flower's fixed-clipping DP also uses); and
* sensitivity 2C against *any* other data at the site — in particular the same data with one case
  changed, added or removed. Case-level protection therefore follows from the site-level clip, but
  with twice the sensitivity (four times the zCDP cost), and both figures are reported.

Accounting is zero-concentrated DP (Bun & Steinke 2016): a Gaussian release with L2 sensitivity Δ and
noise std σ is ρ = Δ²/(2σ²)-zCDP; ρ adds up over (adaptively chosen) releases; ρ-zCDP implies
(ε, δ)-DP with ε = ρ + 2√(ρ ln(1/δ)) (Bun & Steinke Prop. 1.3), or the tighter conversion of
Canonne, Kamath & Steinke 2020 (Prop. 12 with the Rényi divergences of zCDP) — ``zcdp_to_epsilon_cks``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

# The trainable parameters of common.model.RadiomicsLogistic (its buffers are "mean" and "scale").
TRAINABLE_KEYS: tuple[str, ...] = ("linear.weight", "linear.bias")
# those of the mlp family (common.mlp.RadiomicsMLP; same buffers)
MLP_TRAINABLE_KEYS: tuple[str, ...] = ("hidden.weight", "hidden.bias", "output.weight", "output.bias")


def trainable_keys(state: Mapping[str, object]) -> tuple[str, ...]:
    """The trainable arrays of a received model: the mlp family's when it has a hidden layer, else the linear ones
    (every other array must come back unchanged, see privatize_update)."""
    return MLP_TRAINABLE_KEYS if "hidden.weight" in state else TRAINABLE_KEYS

# Run-config keys (pyproject [tool.flwr.app.config]).
NOISE_MULTIPLIER_KEY = "dp-noise-multiplier"  # 0 (default): DP off
CLIP_NORM_KEY = "dp-clip-norm"
DELTA_KEY = "dp-delta"  # accounting only (server side)
DEFAULT_DELTA = 1e-5

COUNT_SENSITIVITY = 1.0  # one case added or removed changes a count by 1


class DPConfigError(ValueError):
    """DP is requested with settings that cannot give a guarantee; nothing is sent."""


@dataclass(frozen=True)
class DPSettings:
    clip_norm: float
    noise_multiplier: float
    delta: float = DEFAULT_DELTA

    @property
    def sigma(self) -> float:
        return self.noise_multiplier * self.clip_norm


def settings_from_config(config: Mapping[str, object]) -> DPSettings | None:
    """The run's DP settings, or None when ``dp-noise-multiplier`` is absent or 0 (DP off).

    Raises DPConfigError for a negative or non-finite multiplier, and, with DP on, for a clip norm
    that is missing, not positive or not finite, or a delta outside (0, 1).
    """
    z = _number(config, NOISE_MULTIPLIER_KEY, 0.0)
    if not math.isfinite(z) or z < 0:
        raise DPConfigError(f"{NOISE_MULTIPLIER_KEY} = {z}: it must be 0 (off) or a positive number")
    if z == 0:
        return None
    if CLIP_NORM_KEY not in config:
        raise DPConfigError(f"{NOISE_MULTIPLIER_KEY} = {z} needs {CLIP_NORM_KEY} (the L2 bound of an update)")
    clip = _number(config, CLIP_NORM_KEY, 0.0)
    if not math.isfinite(clip) or clip <= 0:
        raise DPConfigError(f"{CLIP_NORM_KEY} = {clip}: it must be a positive number")
    delta = _number(config, DELTA_KEY, DEFAULT_DELTA)
    if not 0 < delta < 1:
        raise DPConfigError(f"{DELTA_KEY} = {delta}: it must lie strictly between 0 and 1")
    return DPSettings(clip_norm=clip, noise_multiplier=z, delta=delta)


def _number(config: Mapping[str, object], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DPConfigError(f"{key} = {value!r}: it must be a number")
    return float(value)


# ---------------------------------------------------------------------------------------------------
# The Gaussian mechanism on model updates


def l2_norm(arrays: Iterable[np.ndarray]) -> float:
    """The L2 norm of all arrays taken together as one flat vector."""
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(a, dtype=np.float64)))) for a in arrays))


def clip_update(delta: Mapping[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the update so its L2 norm over all arrays together is at most ``clip_norm``.

    Returns ``(clipped, original_norm)``; an update already within the bound comes back unchanged
    (as float64 copies). Non-finite values are refused: they would escape the bound.
    """
    if not math.isfinite(clip_norm) or clip_norm <= 0:
        raise ValueError(f"clip_norm = {clip_norm}: it must be a positive number")
    arrays = {k: np.array(v, dtype=np.float64) for k, v in delta.items()}
    for key, value in arrays.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"update {key!r} holds non-finite values: it cannot be clipped")
    norm = l2_norm(arrays.values())
    if norm > clip_norm:
        factor = clip_norm / norm
        arrays = {k: v * factor for k, v in arrays.items()}
    return arrays, norm


def gaussian_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Independent N(0, sigma²) entries (float64)."""
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma = {sigma}: it must be a non-negative number")
    return rng.normal(0.0, sigma, size=shape) if sigma > 0 else np.zeros(shape)


def privatize_update(global_state: Mapping[str, np.ndarray], local_state: Mapping[str, np.ndarray],
                     trainable_keys: Iterable[str], clip_norm: float, noise_multiplier: float,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``global + clip(local - global, C) + N(0, (noise_multiplier * C)²)`` on the trainable arrays.

    Every other array (buffers such as ``mean``/``scale``) is returned as the site holds it, and must
    equal what it received: a buffer changed at the site would leave without noise, so it is refused.
    The result has ``local_state``'s keys, order, shapes and dtypes.
    """
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(f"noise_multiplier = {noise_multiplier}: it must be a non-negative number")
    trainable = list(trainable_keys)
    if set(global_state) != set(local_state):
        raise ValueError(f"the update's arrays {sorted(local_state)} are not the received model's "
                         f"{sorted(global_state)}")
    missing = [k for k in trainable if k not in local_state]
    if missing:
        raise ValueError(f"trainable arrays {missing} are not in the update")
    for key, value in local_state.items():
        if np.shape(value) != np.shape(global_state[key]):
            raise ValueError(f"array {key!r} has shape {np.shape(value)}, the received model "
                             f"{np.shape(global_state[key])}")
        if key not in trainable and not np.array_equal(value, global_state[key]):
            raise ValueError(f"array {key!r} is not trainable but differs from the received model: "
                             "it would leave without noise")
    delta = {k: np.asarray(local_state[k], dtype=np.float64) - np.asarray(global_state[k], dtype=np.float64)
             for k in trainable}
    clipped, _ = clip_update(delta, clip_norm)
    sigma = noise_multiplier * clip_norm
    out: dict[str, np.ndarray] = {}
    for key, value in local_state.items():
        if key in clipped:
            noisy = (np.asarray(global_state[key], dtype=np.float64) + clipped[key]
                     + gaussian_noise(np.shape(value), sigma, rng))
            out[key] = noisy.astype(np.asarray(value).dtype, copy=False)
        else:
            out[key] = np.array(value, copy=True)
    return out


# ---------------------------------------------------------------------------------------------------
# The Gaussian mechanism on summary statistics (sums and counts over cases)


def clip_features(x: np.ndarray, clip: float) -> np.ndarray:
    """Standardised features clipped entry-wise to ``[-clip, clip]`` (bounds each case's influence)."""
    if not math.isfinite(clip) or clip <= 0:
        raise ValueError(f"clip = {clip}: it must be a positive number")
    return np.clip(np.asarray(x, dtype=np.float64), -clip, clip)


def sum_sensitivity(clip: float, n_features: int, replace: bool = False) -> float:
    """L2 sensitivity of the vector of per-feature sums of ``clip_features`` over cases:
    ``clip·√d`` for one case added or removed, twice that for one case replaced."""
    return (2.0 if replace else 1.0) * clip * math.sqrt(n_features)


def privatize_sum(values: np.ndarray, sensitivity: float, sigma: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """One Gaussian release of a sum (or count) with L2 ``sensitivity``: ``(values + N(0, sigma²), rho)``,
    ``rho`` being its zCDP cost (compose it with the run's other releases)."""
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma = {sigma}: a private release needs positive noise")
    values = np.asarray(values, dtype=np.float64)
    return values + gaussian_noise(values.shape, sigma, rng), zcdp_gaussian(sensitivity, sigma)


# ---------------------------------------------------------------------------------------------------
# Accounting: zero-concentrated DP


def zcdp_gaussian(sensitivity: float, sigma: float) -> float:
    """ρ of one Gaussian release: Δ² / (2σ²) (Bun & Steinke 2016, Prop. 1.6)."""
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma = {sigma}: the Gaussian mechanism needs positive noise")
    if not math.isfinite(sensitivity) or sensitivity < 0:
        raise ValueError(f"sensitivity = {sensitivity}: it must be a non-negative number")
    return sensitivity ** 2 / (2.0 * sigma ** 2)


def compose(rhos: Iterable[float]) -> float:
    """zCDP composes additively, also for adaptively chosen releases (Bun & Steinke 2016, Lemma 2.3)."""
    return float(sum(rhos))


def zcdp_to_epsilon(rho: float, delta: float) -> float:
    """(ε, δ)-DP implied by ρ-zCDP: ε = ρ + 2√(ρ ln(1/δ)) (Bun & Steinke 2016, Prop. 1.3)."""
    _check_rho_delta(rho, delta)
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def zcdp_to_epsilon_cks(rho: float, delta: float) -> float:
    """The tighter conversion: ε = min over α > 1 of
    αρ + ln(1 − 1/α) − (ln δ + ln α)/(α − 1) (Canonne, Kamath & Steinke 2020, Prop. 12, with
    ρ-zCDP's Rényi divergence αρ at every order α).

    Every α gives a valid ε, so the numerical minimum is never below the true bound of the formula;
    it is always at most ``zcdp_to_epsilon``.
    """
    _check_rho_delta(rho, delta)
    if rho == 0:
        return 0.0

    def eps(alpha: np.ndarray) -> np.ndarray:
        return alpha * rho + np.log1p(-1.0 / alpha) - (math.log(delta) + np.log(alpha)) / (alpha - 1.0)

    # grid over α - 1 in [1e-6, 1e8] (log scale), then a golden-section search around the best point
    grid = 1.0 + np.logspace(-6, 8, 2801)
    values = eps(grid)
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(100):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if eps(np.array(a)) <= eps(np.array(b)):
            hi = b
        else:
            lo = a
    best = min(float(values[i]), float(eps(np.array((lo + hi) / 2.0))))
    return max(best, 0.0)


def _check_rho_delta(rho: float, delta: float) -> None:
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho = {rho}: it must be a non-negative number")
    if not 0 < delta < 1:
        raise ValueError(f"delta = {delta}: it must lie strictly between 0 and 1")


@dataclass
class DPAccount:
    """The privacy spent on model updates in a run, for the audit log.

    ``add_round(sites)`` after every aggregated ``train`` round, naming the sites whose update was
    used; a site's spend grows with the updates it sent (leave-one-site-out folds count too).
    The headline figures are those of the site that sent the most updates.
    """

    clip_norm: float
    noise_multiplier: float
    delta: float = DEFAULT_DELTA
    releases: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not math.isfinite(self.noise_multiplier) or self.noise_multiplier <= 0:
            raise ValueError("an account needs a positive noise multiplier (DP on)")
        if not math.isfinite(self.clip_norm) or self.clip_norm <= 0:
            raise ValueError("an account needs a positive clip norm")
        _check_rho_delta(0.0, self.delta)

    @classmethod
    def from_settings(cls, settings: DPSettings) -> DPAccount:
        return cls(settings.clip_norm, settings.noise_multiplier, settings.delta)

    @property
    def sigma(self) -> float:
        return self.noise_multiplier * self.clip_norm

    @property
    def rounds(self) -> int:
        return max(self.releases.values(), default=0)

    @property
    def rho_per_round(self) -> float:
        """Site-level: the site's update present vs. a zero update (sensitivity C): 1/(2z²)."""
        return zcdp_gaussian(self.clip_norm, self.sigma)

    @property
    def rho_any_change_per_round(self) -> float:
        """Any change of the site's data, e.g. one case changed/added/removed (sensitivity 2C): 2/z²."""
        return zcdp_gaussian(2.0 * self.clip_norm, self.sigma)

    def add_round(self, sites: Iterable[str]) -> None:
        for site in sites:
            self.releases[site] = self.releases.get(site, 0) + 1

    def spent(self, rounds: int | None = None) -> dict[str, float]:
        n = self.rounds if rounds is None else rounds
        rho = compose([self.rho_per_round] * n)
        rho_any = compose([self.rho_any_change_per_round] * n)
        return {"rho": rho, "epsilon": zcdp_to_epsilon(rho, self.delta),
                "epsilon_cks": zcdp_to_epsilon_cks(rho, self.delta),
                "rho_any_change": rho_any, "epsilon_any_change": zcdp_to_epsilon(rho_any, self.delta),
                "epsilon_any_change_cks": zcdp_to_epsilon_cks(rho_any, self.delta)}

    def to_dict(self) -> dict[str, object]:
        return {
            "mechanism": "gaussian: each site clips its update (L2 over linear.weight and linear.bias) "
                         "and adds noise before it leaves the site",
            "unit": "site (one site's whole contribution to a round, vs. a zero update); "
                    "the *_any_change figures cover any change of the site's data, e.g. one case",
            "accounting": "zCDP (Bun & Steinke 2016), eps = rho + 2 sqrt(rho ln(1/delta)); "
                          "*_cks: Canonne, Kamath & Steinke 2020",
            "covers": "train replies' model arrays only; counts, losses, evaluation metrics and the "
                      "query phases' statistics are sent exactly",
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "sigma": self.sigma,
            "delta": self.delta,
            "rounds": self.rounds,
            **self.spent(),
            "per_site": {site: {"rounds": n, "epsilon": self.spent(n)["epsilon"]}
                         for site, n in sorted(self.releases.items())},
        }

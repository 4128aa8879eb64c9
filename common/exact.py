"""Exact federated logistic regression: Newton's method on summed site gradients and Hessians (pure numpy).

The model is the one in ``common/model.py``: ``logit = b + w . z`` with ``z = (x - mean) / scale`` standardised
with the federation's pooled mean and scale. The fit minimises, over beta = [b, w_1..w_d] (shape (d+1,)),

    J(beta) = sum over sites and cases of s_i * [log(1 + exp(eta_i)) - y_i * eta_i]
              + (l2 / 2) * ||w||^2 + l1 * ||w||_1,          eta_i = b + w . z_i,

with s_i = pos_weight for y_i = 1 and 1 for y_i = 0 (``BCEWithLogitsLoss(pos_weight=...)`` summed, not
averaged). The intercept is never penalised. This equals scikit-learn's
``LogisticRegression(C=1/l2, class_weight={0: 1, 1: pos_weight})`` on the pooled data.

Protocol, one round per Newton step:

1. the server sends the current beta (d+1 numbers);
2. every site returns :func:`site_terms` at beta: the gradient (d+1,), the Hessian (d+1, d+1), the loss sum and
   its case counts. Every size is fixed by d, never by the number of cases;
3. the server sums them (:func:`sum_terms`) and takes a step (:class:`ExactNewton`, :func:`newton_update`).

The log-likelihood is a sum over cases, so the summed site terms are exactly the pooled terms and the fit is the
pooled fit, whatever the split of cases between sites. :func:`fit_exact` runs this protocol in one process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Below this ratio of smallest to largest eigenvalue the penalised Hessian is lifted (Levenberg damping).
RCOND = 1e-10
# A trial point whose objective exceeds the last accepted one by more than this (relative) is rejected.
ACCEPT_RTOL = 1e-12
# Consecutive step halvings before the server gives up on a direction.
MAX_HALVINGS = 30


@dataclass(frozen=True)
class SiteTerms:
    """What one site sends per round (or the sum over sites).

    grad: (d+1,) gradient of the summed class-weighted NLL w.r.t. [b, w], unpenalised.
    hess: (d+1, d+1) its Hessian, symmetric.
    loss: the summed class-weighted NLL at the coefficients it was evaluated at.
    n, n_pos, n_neg: cases, positives (y=1), negatives (y=0).
    """

    grad: np.ndarray
    hess: np.ndarray
    loss: float
    n: int
    n_pos: int
    n_neg: int

    def __add__(self, other: SiteTerms) -> SiteTerms:
        if self.grad.shape != other.grad.shape:
            raise ValueError(f"site terms of different sizes: {self.grad.shape} and {other.grad.shape}")
        return SiteTerms(self.grad + other.grad, self.hess + other.hess, self.loss + other.loss,
                         self.n + other.n, self.n_pos + other.n_pos, self.n_neg + other.n_neg)


def _sigmoid_pair(eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sigmoid(eta), sigmoid(-eta)), each computed directly so that 1 - p never cancels for large |eta|."""
    p = np.exp(-np.logaddexp(0.0, -eta))
    q = np.exp(-np.logaddexp(0.0, eta))
    return p, q


def site_terms(z: np.ndarray, y: np.ndarray, coef: np.ndarray, pos_weight: float) -> SiteTerms:
    """Gradient (d+1,), Hessian (d+1, d+1) and sum of the class-weighted NLL over one site's cases at ``coef``.

    z: (n, d) features ALREADY standardised with the federation's mean and scale.
    y: (n,) labels in {0, 1} (1 = HGG, weighted by ``pos_weight``).
    coef: (d+1,) = [b, w_1..w_d].
    Not penalised: the penalty is the server's business (it is not a sum over sites).
    """
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).ravel()
    coef = np.asarray(coef, dtype=np.float64).ravel()
    if z.ndim != 2 or z.shape[0] != y.shape[0]:
        raise ValueError(f"need z of shape (n, d) and y of shape (n,), got {z.shape} and {y.shape}")
    if coef.shape != (z.shape[1] + 1,):
        raise ValueError(f"coef must have shape ({z.shape[1] + 1},) = [b, w...], got {coef.shape}")
    # the array methods rather than np.all / np.column_stack: the same values, without numpy's dispatch overhead,
    # which was most of the cost at a tiny site (one call per fold and Newton round at every site)
    positive = y == 1
    if not (positive | (y == 0)).all():
        raise ValueError("labels must be 0 or 1")
    if not (np.isfinite(z).all() and np.isfinite(coef).all()):
        raise ValueError("features and coefficients must be finite")
    if not pos_weight > 0:
        raise ValueError(f"pos_weight must be positive, got {pos_weight}")
    weight = np.where(positive, float(pos_weight), 1.0)
    eta = coef[0] + z @ coef[1:]
    p, q = _sigmoid_pair(eta)
    # d/d eta of s*[log(1+e^eta) - y*eta] is s*(p - y): -s*q for positives, s*p for negatives (no cancellation)
    residual = weight * np.where(positive, -q, p)
    curvature = weight * p * q
    design = np.empty((len(y), z.shape[1] + 1))
    design[:, 0], design[:, 1:] = 1.0, z
    hess = (design * curvature[:, None]).T @ design
    loss = float(np.sum(weight * (np.logaddexp(0.0, eta) - y * eta)))
    n_pos = int(np.count_nonzero(positive))
    return SiteTerms(grad=design.T @ residual, hess=(hess + hess.T) / 2.0, loss=loss, n=int(len(y)),
                     n_pos=n_pos, n_neg=int(len(y)) - n_pos)


def sum_terms(terms: Iterable[SiteTerms]) -> SiteTerms:
    """The federation's terms: the sum over sites (equal to the terms of the pooled cases)."""
    total: SiteTerms | None = None
    for t in terms:
        total = t if total is None else total + t
    if total is None:
        raise ValueError("no site terms to sum")
    return total


def check_dimensions(n_cases: int, d: int, site_name: str = "site", min_cases_per_parameter: float = 1.0) -> None:
    """Refuse a site whose cases are too few for the exact protocol's (d+1)-sized gradient and Hessian.

    Rule: the site takes part only if ``n_cases > min_cases_per_parameter * (d + 1)``; the default (1) is the
    hard floor, i.e. refuse whenever features + intercept >= cases. Why: a site's Hessian X'WX has rank at most
    n_cases; with n_cases <= d + 1 the Hessians of two rounds (different W) identify the site's rows of X through
    a generalised eigenproblem, so the "aggregate" would disclose the cases themselves. Above the floor nothing
    is identified from one round, but a site sends ~(d+1)(d+2)/2 numbers per round, so a larger factor (e.g. 2)
    is a sensible margin where the federation can afford it.
    """
    n_parameters = d + 1
    if n_cases <= min_cases_per_parameter * n_parameters:
        need = int(np.floor(min_cases_per_parameter * n_parameters)) + 1
        raise ValueError(
            f"{site_name}: {n_cases} cases are too few for exact federated logistic regression with {d} features "
            f"({n_parameters} coefficients with the intercept; it needs more than "
            f"{min_cases_per_parameter:g} x {n_parameters}, i.e. at least {need} cases). Select fewer features "
            f"with `select-features` (at most {max_features(n_cases, min_cases_per_parameter)} here), lower "
            f"`exact-min-cases-per-coefficient` (now {min_cases_per_parameter:g}; 1 is the floor), "
            "or train with `training = \"fedavg\"` instead.")


def max_features(n_cases: int, min_cases_per_parameter: float) -> int:
    """The most features ``check_dimensions`` lets a site with ``n_cases`` training cases fit (0: none)."""
    if min_cases_per_parameter <= 0:
        return n_cases
    return max(int(np.ceil(n_cases / min_cases_per_parameter)) - 2, 0)


def penalised_objective(loss: float, coef: np.ndarray, l2: float, l1: float = 0.0) -> float:
    """J = loss + (l2/2)||w||^2 + l1||w||_1 for coef (d+1,) = [b, w...]; the intercept is not penalised."""
    w = np.asarray(coef, dtype=np.float64)[1:]
    return float(loss + 0.5 * l2 * (w @ w) + l1 * np.abs(w).sum())


@dataclass(frozen=True)
class NewtonInfo:
    """One server step. step_norm: max |new - old| coefficient. optimality at the OLD point (where the sites
    evaluated): max |gradient of J| when l1 == 0, else the max KKT violation (distance of 0 from the
    subdifferential). damping: the Levenberg shift added to the Hessian (0 when well conditioned).
    cd_sweeps: coordinate-descent sweeps of the L1 sub-problem (0 without L1)."""

    step_norm: float
    optimality: float
    damping: float
    cd_sweeps: int


def _penalty_mask(dim: int) -> np.ndarray:
    mask = np.ones(dim)
    mask[0] = 0.0  # the intercept is never penalised: it would bias the predicted class balance
    return mask


def _damped(hess: np.ndarray, rcond: float) -> tuple[np.ndarray, float]:
    """Lift the spectrum to at least rcond * largest eigenvalue (Levenberg): keeps the solve well posed when
    l2 = 0 and features are collinear or constant (a constant feature standardises to 0)."""
    eig = np.linalg.eigvalsh(hess)
    top = max(float(eig[-1]), 1.0)
    shift = max(rcond * top - float(eig[0]), 0.0)
    return (hess + shift * np.eye(len(hess)) if shift > 0 else hess), shift


def _kkt_violation(grad: np.ndarray, w: np.ndarray, l1: float) -> float:
    """max over coordinates of the distance of 0 from the subdifferential of J (grad is the smooth part's)."""
    viol = np.empty_like(grad)
    viol[0] = abs(grad[0])
    gw = grad[1:]
    viol[1:] = np.where(w != 0, np.abs(gw + l1 * np.sign(w)), np.maximum(np.abs(gw) - l1, 0.0))
    return float(viol.max())


def _prox_newton_cd(grad: np.ndarray, hess: np.ndarray, coef: np.ndarray, l1: float, tol: float,
                    max_sweeps: int) -> tuple[np.ndarray, int]:
    """argmin over beta of grad.(beta - coef) + 1/2 (beta - coef)' H (beta - coef) + l1 ||beta[1:]||_1 by cyclic
    coordinate descent with soft-thresholding; beta[0] (the intercept) is unpenalised."""
    beta = coef.copy()
    r = grad.copy()  # gradient of the quadratic model at beta
    diag = np.diag(hess)
    for sweep in range(1, max_sweeps + 1):
        biggest = 0.0
        for j in range(len(beta)):
            u = beta[j] - r[j] / diag[j]
            new = u if j == 0 else np.sign(u) * max(abs(u) - l1 / diag[j], 0.0)
            change = new - beta[j]
            if change != 0.0:
                r += hess[:, j] * change
                beta[j] = new
                biggest = max(biggest, abs(change))
        if biggest <= tol * max(1.0, float(np.abs(beta).max())):
            return beta, sweep
    return beta, max_sweeps


def newton_update(total_grad: np.ndarray, total_hess: np.ndarray, coef: np.ndarray, l2: float, l1: float = 0.0,
                  *, rcond: float = RCOND, cd_tol: float = 1e-14, cd_max_sweeps: int = 10_000,
                  ) -> tuple[np.ndarray, NewtonInfo]:
    """One server step from the summed, unpenalised site terms at ``coef``: returns (new coef (d+1,), info).

    total_grad: (d+1,), total_hess: (d+1, d+1), coef: (d+1,) = [b, w...]. The L2 penalty is added here.

    l1 == 0: a full Newton step on J. Step-halving would need J at the trial point, i.e. another round, so the
    step is not searched: J is strictly convex (l2 > 0) and the logistic NLL is self-concordant-like, and the full
    step from zero converges in a handful of rounds in practice. When the penalised Hessian is ill-conditioned
    (eigenvalue ratio below ``rcond``) it is lifted by a multiple of the identity (Levenberg), which shortens the
    step without moving the fixed point. (:class:`ExactNewton` adds a safeguard across rounds: a trial point
    whose J, known one round later for free, went up is halved back.)

    l1 > 0: proximal Newton. The local quadratic model of the smooth part plus l1||w||_1 is minimised by cyclic
    coordinate descent with soft-thresholding; the intercept is unpenalised. Exact zeros come out of the
    thresholding.
    """
    grad = np.asarray(total_grad, dtype=np.float64).ravel()
    coef = np.asarray(coef, dtype=np.float64).ravel()
    hess = np.asarray(total_hess, dtype=np.float64)
    dim = coef.shape[0]
    if grad.shape != (dim,) or hess.shape != (dim, dim):
        raise ValueError(f"need grad ({dim},) and Hessian ({dim}, {dim}), got {grad.shape} and {hess.shape}")
    if l2 < 0 or l1 < 0:
        raise ValueError(f"penalties must be non-negative, got l2={l2}, l1={l1}")
    mask = _penalty_mask(dim)
    g = grad + l2 * mask * coef  # gradient and Hessian of the smooth part of J
    h, shift = _damped((hess + hess.T) / 2.0 + l2 * np.diag(mask), rcond)
    if l1 == 0:
        new = coef - np.linalg.solve(h, g)
        return new, NewtonInfo(float(np.abs(new - coef).max()), float(np.abs(g).max()), shift, 0)
    new, sweeps = _prox_newton_cd(g, h, coef, l1, cd_tol, cd_max_sweeps)
    return new, NewtonInfo(float(np.abs(new - coef).max()), _kkt_violation(g, coef[1:], l1), shift, sweeps)


@dataclass(frozen=True)
class RoundRecord:
    """One round at the server: J at the point the sites evaluated, whether that point was accepted, and the
    step taken from it (None when rejected: the next point is then halfway back towards the last accepted)."""

    objective: float
    accepted: bool
    info: NewtonInfo | None


@dataclass
class ExactNewton:
    """The server side of the exact protocol, one :meth:`update` per round.

    Broadcast ``coef`` (d+1,), collect every site's :func:`site_terms` at it, pass their sum to :meth:`update`;
    repeat until it returns True. ``coef`` then holds the final model.

    Stopping rule: the step from an accepted point is at most ``tol * max(1, max|coef|)`` (Newton converges
    quadratically, so the last step is far below the error it leaves), or the NEXT step, predicted from the last
    two (s_next ~ s^3 / s_prev^2 once convergence is quadratic: both undamped, shrinking, l1 = 0), is: that round
    would only confirm it and is not sent, and the point kept is within ``tol`` of the optimum as well; or
    ``max_rounds`` rounds (``converged`` stays False). Safeguard: the sites' loss sum gives J at every point they
    evaluate; if J rose above the last accepted point's, that point is rejected and the next one is halfway back
    (costs a round only when a full step overshoots, which from zero with l2 > 0 is rare).
    """

    d: int
    l2: float
    l1: float = 0.0
    tol: float = 1e-10
    max_rounds: int = 50
    # False when the sites' terms are noised (differential privacy): no loss comes back, so every point is
    # accepted, and a noised step never meets ``tol``: the fit runs ``max_rounds`` rounds
    safeguard: bool = True
    # where round 1 evaluates (d+1,); None: zero. A warm start (e.g. a leave-one-site-out fold from the main run's
    # model) only shortens the walk: J is strictly convex, so the fit stops at the same optimum within ``tol``
    start: np.ndarray | None = None
    coef: np.ndarray = field(init=False)
    converged: bool = field(init=False, default=False)
    history: list[RoundRecord] = field(init=False, default_factory=list)
    _best: np.ndarray | None = field(init=False, default=None, repr=False)
    _best_objective: float = field(init=False, default=float("inf"), repr=False)
    _halvings: int = field(init=False, default=0, repr=False)

    def __post_init__(self) -> None:
        if self.start is None:
            self.coef = np.zeros(self.d + 1)
            return
        start = np.asarray(self.start, dtype=np.float64).ravel()
        if start.shape != (self.d + 1,) or not np.isfinite(start).all():
            raise ValueError(f"a Newton start needs {self.d + 1} finite coefficients (intercept first), got "
                             f"shape {start.shape}")
        self.coef = start.copy()

    @property
    def rounds(self) -> int:
        return len(self.history)

    @property
    def done(self) -> bool:
        return self.converged or self.rounds >= self.max_rounds or self._halvings > MAX_HALVINGS

    def _within_tol(self, info: NewtonInfo) -> bool:
        """Whether the step just taken (``info``, from ``self.coef``) or the predicted next one is within tol."""
        bound = self.tol * max(1.0, float(np.abs(self.coef).max()))
        step = info.step_norm
        if step <= bound:
            return True
        prev = self.history[-2].info if len(self.history) >= 2 and self.history[-2].accepted else None
        if prev is None or self.l1 != 0 or not self.safeguard or info.damping or prev.damping:
            return False
        return step < prev.step_norm and step ** 3 <= bound * prev.step_norm ** 2

    def update(self, total: SiteTerms) -> bool:
        """Take the summed site terms at ``self.coef``; set the next ``coef``. True when finished."""
        if self.done:
            raise RuntimeError("the fit is already finished")
        objective = penalised_objective(total.loss, self.coef, self.l2, self.l1) if self.safeguard else float("nan")
        if self.safeguard and self._best is not None and objective > self._best_objective + ACCEPT_RTOL * max(1.0, abs(
                self._best_objective)):
            self.history.append(RoundRecord(objective, False, None))
            self._halvings += 1
            self.coef = self._best + 0.5 * (self.coef - self._best)
            if self.done:  # give up on this direction: keep the best point seen
                self.coef = self._best.copy()
            return self.done
        self._best, self._best_objective, self._halvings = self.coef.copy(), objective, 0
        new, info = newton_update(total.grad, total.hess, self.coef, self.l2, self.l1)
        self.history.append(RoundRecord(objective, True, info))
        self.converged = self._within_tol(info)
        self.coef = new
        return self.done


@dataclass(frozen=True)
class ExactFit:
    """Result of :func:`fit_exact`. coef (d+1,) = [b, w...]; objective: J at the point of each round."""

    coef: np.ndarray
    converged: bool
    rounds: int
    objective: list[float]
    history: list[RoundRecord]
    n: int
    n_pos: int
    n_neg: int

    @property
    def intercept(self) -> float:
        return float(self.coef[0])

    @property
    def weights(self) -> np.ndarray:
        return self.coef[1:]


def fit_exact(sites: Sequence[tuple[np.ndarray, np.ndarray]], pos_weight: float, l2: float, l1: float = 0.0,
              tol: float = 1e-10, max_rounds: int = 50, min_cases_per_parameter: float = 1.0) -> ExactFit:
    """Run the exact protocol in one process over per-site ``(z (n_k, d), y (n_k,))``, z already standardised.

    Same steps as the federation: each site is checked (:func:`check_dimensions`), then per round every site's
    :func:`site_terms` are summed and the server (:class:`ExactNewton`) steps.
    """
    if not sites:
        raise ValueError("no sites")
    d = int(np.asarray(sites[0][0]).shape[1])
    for k, (z, _) in enumerate(sites):
        check_dimensions(int(np.asarray(z).shape[0]), d, f"site {k}", min_cases_per_parameter)
    server = ExactNewton(d, l2, l1, tol, max_rounds)
    total = None
    while True:
        total = sum_terms(site_terms(z, y, server.coef, pos_weight) for z, y in sites)
        if server.update(total):
            break
    return ExactFit(coef=server.coef.copy(), converged=server.converged, rounds=server.rounds,
                    objective=[r.objective for r in server.history], history=list(server.history), n=total.n,
                    n_pos=total.n_pos, n_neg=total.n_neg)


def restandardise(coef: np.ndarray, names: Sequence[str], mean: np.ndarray, scale: np.ndarray,
                  new_names: Sequence[str], new_mean: np.ndarray, new_scale: np.ndarray) -> np.ndarray:
    """A fitted model's coefficients (d+1,) on ``names`` standardised with (mean, scale), re-expressed on
    ``new_names`` standardised with (new_mean, new_scale): the same logit on every case for the inputs both lists
    hold, weight 0 on the new ones; an input the new list lacks leaves at its mean. A Newton start, nothing more."""
    coef = np.asarray(coef, dtype=np.float64).ravel()
    old = {n: j for j, n in enumerate(names)}
    out = np.zeros(len(new_names) + 1)
    out[0] = coef[0]
    for k, n in enumerate(new_names):
        j = old.get(n)
        if j is not None:  # w (x - m) / s = (w s' / s) (x - m') / s' + w (m' - m) / s
            out[k + 1] = coef[j + 1] * new_scale[k] / scale[j]
            out[0] += coef[j + 1] * (new_mean[k] - mean[j]) / scale[j]
    return out


def to_state_dict(coef: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> dict[str, torch.Tensor]:
    """The state dict of ``RadiomicsLogistic(d)`` (mean (d,), scale (d,), linear.weight (1, d), linear.bias (1,),
    float64) for coef (d+1,) = [b, w...] fitted on z = (x - mean) / scale."""
    coef = np.asarray(coef, dtype=np.float64).ravel()
    mean = np.asarray(mean, dtype=np.float64).ravel()
    scale = np.asarray(scale, dtype=np.float64).ravel()
    d = mean.shape[0]
    if coef.shape != (d + 1,) or scale.shape != (d,):
        raise ValueError(f"need coef ({d + 1},) and scale ({d},), got {coef.shape} and {scale.shape}")
    import torch  # here, not at the top: sites fit and score with numpy, and torch takes seconds to import

    from common.model import RadiomicsLogistic

    net = RadiomicsLogistic(d)  # built from the model itself so keys, order, shapes and dtypes always agree
    with torch.no_grad():
        net.mean.copy_(torch.from_numpy(mean))
        net.scale.copy_(torch.from_numpy(scale))
        net.linear.weight.copy_(torch.from_numpy(coef[1:]).reshape(1, d))
        net.linear.bias.copy_(torch.from_numpy(coef[:1]))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def from_state_dict(state: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`to_state_dict`: (coef (d+1,) = [b, w...], mean (d,), scale (d,))."""
    import torch  # only a caller holding torch tensors gets here

    weight = state["linear.weight"].detach().to(torch.float64).numpy().ravel()
    bias = state["linear.bias"].detach().to(torch.float64).numpy().ravel()
    coef = np.concatenate([bias, weight])
    return (coef, state["mean"].detach().to(torch.float64).numpy().copy(),
            state["scale"].detach().to(torch.float64).numpy().copy())

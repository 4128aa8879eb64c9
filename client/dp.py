"""Optional differential privacy for model updates: a Flower client mod (``dp_update_mod``).

For ``train`` messages, when the run config sets ``dp-noise-multiplier`` > 0 (with ``dp-clip-norm``),
the site's update against the global model it received is clipped in L2 over the trainable arrays
(``linear.weight``, ``linear.bias``) and Gaussian noise of std ``dp-noise-multiplier × dp-clip-norm``
is added, with a fresh generator seeded from the operating system, before the reply leaves the site.
The buffers (``mean``, ``scale``) go back as received. With DP off the mod does nothing.

Nothing is added to the reply: whether the update was clipped depends on the data, and the server
knows the clip norm and the multiplier from the run config. The math is in ``common.dp``.

Order: ``client/app.py`` lists ``privacy_guard`` before ``dp_update_mod`` and the first mod is the outermost
(flwr ``make_ffn`` wraps the handler in the mods in reverse order), so the guard checks and logs in
the outbox the reply *after* this mod privatised it: the outbox shows exactly what left.

With DP on, the site also refuses ``query.newton`` (exact training) unless the run noises the query phases
(``dp-query-noise-multiplier`` > 0): an exact reply is the gradient and Hessian summed over the training cases,
the same information as a model update without clip or noise.

``dp_query_mod`` keeps the budget of the noised query phases (moments, correlation, Newton; the handlers clip and
noise, ``common.dp_query``): each release is checked against the site's cap and booked with its kind.

Fails closed: with DP requested, a reply that cannot be privatised (bad settings, arrays that do not
match the received model, a buffer changed at the site, non-finite values) raises, and nothing is sent.

**The site's own budget, across runs.** Every noised update a site sends is appended to
``<output_dir>/release/dp-budget.jsonl`` with its ρ for a change of one case (2/z², zCDP), and so is every noised
query release (its kind named). A site that sets ``dp_budget_epsilon`` in its site.yaml refuses a release that
would take the composed total, updates and queries together, past that ε (at its ``dp_budget_delta``), whatever
run asks, and refuses model updates and the query phases DP covers without noise altogether: the coordinator
cannot spend a hospital's budget by running again.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from client import runcache
from client.site import site_settings
from client.sitefiles import SiteFiles, read_jsonl
from client.steps import locate_site, run_config
from common import dp, dp_query
from common.protocol import NEWTON, TREES, WITHHELD_WHEN_NOISED

log = logging.getLogger("flwr.radfed.client")

ARRAYS = "arrays"  # the strategy's arrayrecord_key (FedAvg default), in train messages and replies


class DPError(RuntimeError):
    """DP was requested but this reply cannot be privatised; nothing is sent."""


def _is_train(msg: Message) -> bool:
    return msg.metadata.message_type.split(".", 1)[0] == MessageType.TRAIN


def _state(record: object, what: str) -> dict[str, np.ndarray]:
    if not isinstance(record, ArrayRecord):
        raise DPError(f"dp_update_mod: the {what} holds no ArrayRecord {ARRAYS!r}; nothing is sent")
    return {key: array.numpy() for key, array in record.items()}


def _query_noised(context: Context) -> bool:
    value = context.run_config.get(dp_query.NOISE_KEY, 0.0)
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


class SiteBudget:
    """The site's DP budget ledger (``<output_dir>/release/dp-budget.jsonl``) and its own cap, if it set one."""

    def __init__(self, context: Context) -> None:
        settings = site_settings(locate_site(context.node_config, run_config(context.run_config)))
        self.path = SiteFiles(Path(settings["output_dir"])).dp_budget
        self.cap: float | None = settings.get("dp_budget_epsilon")
        self.delta = float(settings.get("dp_budget_delta", 1e-5))

    def spent_rho(self) -> float:
        entries = read_jsonl(self.path, lambda e: isinstance(e.get("rho"), int | float), "a budget entry (rho)",
                             "the DP budget ledger is append-only: restore it from backup; until then nothing noised "
                             "can be sent")
        return dp.compose(float(e["rho"]) for e in entries) if entries else 0.0

    def check(self, rho: float, what: str = "dp_update_mod: this update") -> None:
        """Refuse when one more release of ``rho`` would take the site past its cap."""
        if self.cap is None:
            return
        after = dp.zcdp_to_epsilon(self.spent_rho() + rho, self.delta)
        if after > self.cap:
            raise DPError(f"{what}: this site's DP budget is epsilon = {self.cap:g} (delta {self.delta:g}) "
                          f"over all runs, model updates and query phases together; this release would take it to "
                          f"{after:.3g} (spent so far: "
                          f"{dp.zcdp_to_epsilon(self.spent_rho(), self.delta) if self.spent_rho() else 0:.3g}). "
                          "Nothing is sent; the site administrator decides whether to raise dp_budget_epsilon")

    def record(self, run_id: int, rho: float, kind: str = "train") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": datetime.now(UTC).isoformat(timespec="seconds"), "run_id": run_id,
                                 "rho": rho, "unit": "one case changed", "kind": kind}) + "\n")


def _budget(context: Context) -> SiteBudget:
    """The site's budget ledger and cap, found once per message or batch (each spend is read from the file)."""
    return runcache.in_look(("dp-budget", id(context)), context, lambda: SiteBudget(context))


def dp_update_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: clip and noise the model update of a ``train`` reply when the run asks for DP, within the
    site's own budget."""
    if not _is_train(msg) and msg.metadata.message_type != NEWTON:
        return call_next(msg, context)
    if not _is_train(msg) and _query_noised(context):
        return call_next(msg, context)  # noised exact training: dp_query_mod's business
    try:
        settings = dp.settings_from_config(context.run_config)
    except dp.DPConfigError as exc:
        raise DPError(f"dp_update_mod: {exc}; nothing is sent") from None
    budget = _budget(context)
    if settings is None:
        if budget.cap is not None:
            raise DPError(f"dp_update_mod: this site sends model updates only with differential privacy (its "
                          f"dp_budget_epsilon is {budget.cap:g}); the run has dp-noise-multiplier = 0 "
                          f"{'and exact training' if not _is_train(msg) else ''}. Nothing is sent")
        return call_next(msg, context)
    if not _is_train(msg):
        raise DPError("dp_update_mod: differential privacy is on, and exact training (query.newton) would send "
                      "the exact summed gradient and Hessian; run with training = 'fedavg'. Nothing is sent")
    rho = dp.zcdp_gaussian(2.0 * settings.clip_norm, settings.sigma)  # one case changed: sensitivity 2C
    budget.check(rho)
    received = _state(msg.content.get(ARRAYS), "train message")  # decoded before the handler runs
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    local = _state(reply.content.get(ARRAYS), "reply")
    try:
        private = dp.privatize_update(received, local, dp.trainable_keys(received), settings.clip_norm,
                                      settings.noise_multiplier, np.random.default_rng())
    except ValueError as exc:
        raise DPError(f"dp_update_mod: {exc}; nothing is sent") from None
    reply.content[ARRAYS] = ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in private.items()})
    budget.record(context.run_id, rho)
    log.info("DP: update clipped to L2 norm %g and noised with std %g", settings.clip_norm, settings.sigma)
    return reply


def dp_query_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: the site's DP budget for the noised query phases (the handlers clip and noise, see
    ``common.dp_query``). Each noised release is checked against the site's cap before the handler runs and
    booked in its ledger after (a release the guard then refuses stays booked: the ledger errs on the safe side).
    A site with a cap refuses the query phases DP covers when the run does not noise them."""
    kind = msg.metadata.message_type
    if kind == TREES:  # gradient-boosted trees' histograms have no noised form: a site with a cap never sends them
        cap = _budget(context).cap
        if cap is not None:
            raise DPError(f"dp_query_mod: this site sends statistics of its cases only with differential privacy (its "
                          f"dp_budget_epsilon is {cap:g}), and {kind} (the gbt family) has no noised form. Nothing "
                          "is sent")
        return call_next(msg, context)
    if kind not in dp_query.MECHANISMS and kind not in WITHHELD_WHEN_NOISED:
        return call_next(msg, context)
    run = run_config(context.run_config)
    budget = _budget(context)
    if not run.dp_query:
        if budget.cap is not None:
            raise DPError(f"dp_query_mod: this site sends {kind} only with differential privacy (its "
                          f"dp_budget_epsilon is {budget.cap:g}); the run has dp-query-noise-multiplier = 0. "
                          "Nothing is sent")
        return call_next(msg, context)
    if kind in WITHHELD_WHEN_NOISED:
        return call_next(msg, context)  # the handler refuses it: nothing to book
    rho = dp_query.rho_per_release(kind, run.dp_query_noise_multiplier, changed=True)
    budget.check(rho, f"dp_query_mod: this {kind} release")
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    budget.record(context.run_id, rho, kind)
    log.info("DP: %s noised (multiplier %g, clip %g); rho %.4g booked", kind, run.dp_query_noise_multiplier,
             run.dp_query_clip, rho)
    return reply

"""Optional differential privacy for model updates: a Flower client mod (``dp_update_mod``).

For ``train`` messages, when the run config sets ``dp-noise-multiplier`` > 0 (with ``dp-clip-norm``),
the site's update against the global model it received is clipped in L2 over the trainable arrays
(``linear.weight``, ``linear.bias``) and Gaussian noise of std ``dp-noise-multiplier × dp-clip-norm``
is added, with a fresh generator seeded from the operating system, before the reply leaves the site.
The buffers (``mean``, ``scale``) go back as received. With DP off the mod does nothing.

Nothing is added to the reply: whether the update was clipped depends on the data, and the server
knows the clip norm and the multiplier from the run config. The math is in ``common.dp``.

Order: in ``ClientApp(mods=[privacy_guard, dp_update_mod])`` the first mod is the outermost
(flwr ``make_ffn`` wraps the handler in the mods in reverse order), so the guard checks and logs in
the outbox the reply *after* this mod privatised it: the outbox shows exactly what left.

With DP on, the site also refuses ``query.newton`` (exact training): its reply is the exact gradient and
Hessian summed over the training cases, the same information as a model update without clip or noise.

Fails closed: with DP requested, a reply that cannot be privatised (bad settings, arrays that do not
match the received model, a buffer changed at the site, non-finite values) raises, and nothing is sent.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from common import dp
from common.protocol import NEWTON

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


def dp_update_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: clip and noise the model update of a ``train`` reply when the run asks for DP."""
    if not _is_train(msg) and msg.metadata.message_type != NEWTON:
        return call_next(msg, context)
    try:
        settings = dp.settings_from_config(context.run_config)
    except dp.DPConfigError as exc:
        raise DPError(f"dp_update_mod: {exc}; nothing is sent") from None
    if settings is None:
        return call_next(msg, context)
    if not _is_train(msg):
        raise DPError("dp_update_mod: differential privacy is on, and exact training (query.newton) would send "
                      "the exact summed gradient and Hessian; run with training = 'fedavg'. Nothing is sent")
    received = _state(msg.content.get(ARRAYS), "train message")  # decoded before the handler runs
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    local = _state(reply.content.get(ARRAYS), "reply")
    try:
        private = dp.privatize_update(received, local, dp.TRAINABLE_KEYS, settings.clip_norm,
                                      settings.noise_multiplier, np.random.default_rng())
    except ValueError as exc:
        raise DPError(f"dp_update_mod: {exc}; nothing is sent") from None
    reply.content[ARRAYS] = ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in private.items()})
    log.info("DP: update clipped to L2 norm %g and noised with std %g", settings.clip_norm, settings.sigma)
    return reply

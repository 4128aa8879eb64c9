"""A site's ClientApp that answers ``query.batch``: several folds' requests in one Flower message.

The batch is split BEFORE the mod stack: each sub-request goes through the same registered handler, wrapped in
the same mods (path redaction, privacy guard with the release ledger and the outbox, DP mods, approval check)
as when it arrives on its own, one after another in the order sent. So every sub-reply is checked, booked in the
ledger and logged in the outbox exactly as today; a batch is not a way around any check. A sub-request that is
refused becomes an error sub-reply (that fold's dropout, in the site's own words); the others go on.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from common import batch

log = logging.getLogger("flwr.radfed.client")


class BatchingClientApp(ClientApp):
    """Flower's ClientApp, plus ``query.batch``: split, each sub-request through its handler and mods, joined."""

    def __call__(self, message: Message, context: Context) -> Message:
        if message.metadata.message_type != batch.BATCH:
            return super().__call__(message, context)
        try:
            subs = batch.split(message)
        except (batch.BatchError, KeyError, ValueError, TypeError) as exc:  # nothing of it was read
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{batch.BATCH} refused: {exc}"),
                           reply_to=message)
        replies = []
        for sub in subs:
            try:  # the outermost mod turns a refusal into an error reply; anything else is this sub-request's too
                reply = super().__call__(sub, context)
            except Exception as exc:  # noqa: BLE001  # one fold's failure, not the batch's
                log.error("refusing %s in a batch: %s", sub.metadata.message_type, exc)
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(exc)), reply_to=sub)
            replies.append(reply)
        return batch.join(message, replies)

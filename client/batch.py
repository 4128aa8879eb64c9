"""A site's ClientApp that answers ``query.batch``: several folds' requests in one Flower message.

The batch is split BEFORE the mod stack: each sub-request goes through the same registered handler, wrapped in
the same mods (path redaction, privacy guard with the release ledger and the outbox, DP mods, approval check)
as when it arrives on its own, one after another in the order sent. So every sub-reply is checked on its own; a
batch is not a way around any check. A sub-request that is refused becomes an error sub-reply (that fold's dropout,
in the site's own words); the others go on.

What need not repeat is done once per batch: the site's files are stamped once (client.runcache.one_look), and
the release ledger, releases.jsonl and the outbox are written once, durably, after the last sub-reply
(client.ledger.deferred); each sub-reply is still checked against the ledger INCLUDING the sets the batch's
earlier sub-replies released. A crash before that write sends nothing and writes nothing; once it is done, the
reply leaves, so the ledger can hold sets that never left (if the process dies in between) but never the reverse.
The handlers' inputs that every fold's request of one type shares (the feature list a moments request carries) are
checked once per type and batch (client.shared).
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client import ledger, runcache, shared
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
        # one look at the site's files for the whole batch (client.runcache), and its releases booked in memory,
        # each sub-reply checked against the ledger with the batch's earlier ones, then written once (client.ledger)
        with runcache.one_look(), ledger.deferred() as book, shared.batch_scope():
            replies = []
            for sub in subs:
                try:  # the outermost mod turns a refusal into an error reply; anything else is this sub-request's too
                    reply = super().__call__(sub, context)
                except Exception as exc:  # noqa: BLE001  # one fold's failure, not the batch's
                    log.error("refusing %s in a batch: %s", sub.metadata.message_type, exc)
                    reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(exc)), reply_to=sub)
                replies.append(reply)
            joined = batch.join(message, replies)
            try:  # the ledger and the outbox on disk before anything leaves: else nothing of the batch leaves
                book.write()
            except Exception as exc:  # noqa: BLE001  # the site's own words stay in its log (they name its paths)
                log.error("refusing the whole %s: its releases could not be recorded: %s", batch.BATCH, exc)
                return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{batch.BATCH} refused: the site could "
                                     "not record its releases, so none of its replies was sent (see the site's "
                                     "log)"), reply_to=message)
        return joined

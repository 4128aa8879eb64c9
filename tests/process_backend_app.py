"""A ClientApp for tests/test_process_backend.py: it answers, raises or ends its process as the message asks, and
counts the messages its node has seen in the node's context (which the backend carries back and forth)."""

from __future__ import annotations

import os

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    what = str(msg.content["config"]["what"])
    if what == "raise":
        raise ValueError("hospital-x: a damaged feature table")
    if what == "die":
        os._exit(3)
    seen = int(context.state["count"]["n"]) + 1 if "count" in context.state else 1  # type: ignore[index]
    context.state["count"] = ConfigRecord({"n": seen})
    return Message(RecordDict({"config": ConfigRecord({"pid": os.getpid(), "seen": seen})}), reply_to=msg)

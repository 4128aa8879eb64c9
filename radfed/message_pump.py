"""The in-process simulation's message pump (``radfed demo``): Flower's, swept again as soon as a message is stored.

Flower 1.42's simulation hands the ServerApp's messages to the ClientApp workers from one thread that sweeps every
node for its oldest waiting message, then sleeps 0.1 s (flwr/server/superlink/fleet/vce/vce_api.py,
``add_messages_to_queue``). Every round trip of a run therefore waited 0 to 100 ms before a site saw it: the demo's
~40 round trips after the go spent about 2 s there, against ~1 s of the sites' and the coordinator's own work
(docs/performance.md, stop 40). ``prompt_sweep`` is that thread with a wake-up: the link state's
``store_message_ins`` (which the ServerApp's in-memory grid calls for each message it pushes) sets an event, and
the sweep runs again at once; with nothing stored it sleeps 0.1 s as Flower's does, which is also how soon it sees
the run's stop. The messages, their order per node and what the workers do with them are Flower's own.

Only ``radfed.inprocess`` installs it (``prompt_pump``), for the run it starts in its own process; runs through a
SuperLink (``flwr run``, the tests' and benches' chain) keep Flower's sweep.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

log = logging.getLogger("flwr.radfed.launch")

IDLE_WAIT = 0.1  # Flower's own sweep interval: the pump's when nothing was stored, and how soon it sees the stop
SWEEP_PARAMETERS = ["state", "queue", "nodes_mapping", "f_stop"]  # Flower 1.42's add_messages_to_queue


def prompt_sweep(state: Any, queue: Queue, nodes_mapping: Any, f_stop: threading.Event) -> None:
    """Put each node's oldest waiting message into the workers' ``queue`` (as Flower's sweep: ``limit=1`` per node
    per sweep), sweeping again at once after a sweep that found one or a message stored meanwhile, else after
    ``IDLE_WAIT``; until ``f_stop``. Wraps ``state.store_message_ins`` for the wake-up while it runs."""
    stored = threading.Event()
    store = state.store_message_ins

    def store_and_wake(*args: Any, **kwargs: Any) -> Any:
        try:
            return store(*args, **kwargs)
        finally:
            stored.set()

    state.store_message_ins = store_and_wake  # this state object only (Flower's in-memory link state of the run)
    try:
        while not f_stop.is_set():
            stored.clear()  # before the sweep: a message stored during it wakes the next one
            found = False
            for node_id in list(nodes_mapping.keys()):
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
                    found = True
            if not found:
                stored.wait(IDLE_WAIT)
    finally:
        del state.store_message_ins  # the class's own method again


@contextmanager
def prompt_pump() -> Iterator[bool]:
    """Flower's simulation sweeps with ``prompt_sweep`` while inside (a simulation started inside keeps it to its
    end: Flower looks the sweep up when it starts the sweep's thread). Yields whether it did: a Flower whose sweep
    is not the function ``prompt_sweep`` replaces (another version) keeps its own, and says so in the log."""
    from flwr.server.superlink.fleet.vce import vce_api

    flowers = getattr(vce_api, "add_messages_to_queue", None)
    if flowers is None or list(inspect.signature(flowers).parameters) != SWEEP_PARAMETERS:
        log.warning("radfed: this Flower's simulation sweep is not 1.42's (add_messages_to_queue%s): its own is kept",
                    "" if flowers is None else str(inspect.signature(flowers)))
        yield False
        return
    vce_api.add_messages_to_queue = prompt_sweep
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = flowers

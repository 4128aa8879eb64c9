"""Flower's own in-memory link state and grid, set up as its simulation sets them up (flwr/simulation/
run_simulation.py): for the tests of what the coordinator and the demo's message pump do with them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flwr.proto.task_pb2 import Task
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run as FlowerRun
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

RUN_ID, TASK_ID, SUPERLINK = 7, 11, 1


@contextmanager
def serverapp_identity() -> Iterator[None]:
    """The ServerApp's identity while inside: Flower's Message constructor reads it, and the link state refuses a
    message to a node whose sender is not the SuperLink's node id."""
    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SUPERLINK, TASK_ID
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


def new_link() -> tuple[InMemoryLinkState, InMemoryGrid]:
    """A fresh in-memory link state with run RUN_ID registered, and the ServerApp's grid on it."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = FlowerRun.create_empty(run_id=RUN_ID)  # registered as Flower's simulation does (run_simulation.py)
    run.primary_task_id, run.federation_id = TASK_ID, NOOP_FEDERATION_ID
    state.run_ids[RUN_ID] = RunRecord(run=run)
    state.task_store[TASK_ID] = Task(task_id=TASK_ID, run_id=RUN_ID)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid  # type: ignore[return-value]

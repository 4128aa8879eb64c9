"""The demo's federation inside the launcher's own process (``radfed demo``): Flower's simulation without the
SuperLink, SuperExec, ``flwr run`` and ``flwr-simulation`` processes, its ClientApps served by processes of this
machine instead of Ray actors (``radfed.process_backend``). ``radfed.launch`` holds the chain every other run goes
through (tests, benches, ``flwr run .``: Ray) and what both share: the gate, the end mark and the run config's
overrides.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

from radfed.launch import APP_DIR, BOOT_NICE, RUN_END_MARK, START_GATE, overrides_text, parse_overrides
from radfed.message_pump import prompt_pump
from radfed.process_backend import process_backend

# The demo's federation in the launcher's own process: Flower's simulation API (flwr/simulation/run_simulation.py
# `_run_simulation`, which `flwr-simulation` itself calls once it has the run from its SuperLink), without the
# SuperLink, the SuperExec, `flwr run` and `flwr-simulation` (four processes importing Flower, about 5 CPU s to boot on
# the core the last site's extraction needs). The same ServerApp and ClientApp (by the app's components), the same run
# config (the app's defaults fused with the overrides, as Flower fuses them, for the ServerApp and every node), the
# same gate and end mark; only what Flower's own processes logged about themselves is not shown, and the ClientApps
# run in radfed.process_backend's workers instead of Ray actors (Ray's boot: ~6 CPU s more).
FLWR_QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
# One BLAS/OpenMP thread per ClientApp worker, as Ray gives its actors: the workers already fill the cores
WORKER_ENV = {"OMP_NUM_THREADS": "1"}


class InProcessFederation:
    """A run ``in_process_federation`` started: the simulation boots in a thread of this process (its ClientApp
    workers start; the ServerApp waits at the gate); ``finish`` opens the gate and waits for the run's end."""

    def __init__(self, thread: threading.Thread, outcome: dict[str, object], flwr_home: Path, gate: Path | None,
                 end_mark: Path) -> None:
        self.thread, self.outcome = thread, outcome
        self.flwr_home, self.gate, self.end_mark = flwr_home, gate, end_mark

    def finish(self, timeout: float = 3600) -> int:
        """Open the gate, wait until the ServerApp has announced its end (every output written) or the simulation
        has ended; 0 when the run completed, else 1."""
        if self.gate is not None:
            self.gate.touch()
        deadline = time.monotonic() + timeout
        while self.thread.is_alive() and not self.end_mark.exists():
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("radfed federation (in process)", timeout)
            self.thread.join(0.02)
        if self.end_mark.exists():
            return 0 if json.loads(self.end_mark.read_text(encoding="utf-8"))["status"] == "completed" else 1
        return 1  # the simulation ended without the ServerApp's last lines: its error is in the log above


def _simulate(run_config: Mapping[str, object], num_supernodes: int, app_dir: Path, components: Mapping[str, str],
              outcome: dict[str, object], nice: int = 0) -> None:
    """The simulation, as `flwr-simulation` runs it once it has its run (flwr/simulation/app.py): the app's
    ``components`` (its pyproject's ServerApp and ClientApp), the run config fused for the ServerApp's context and
    each node's; the ClientApps on ``process_backend``'s workers. ``nice``: this thread's niceness, and so every
    thread and process it starts (Linux: per thread, inherited), not the launcher's other threads."""
    if nice:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    try:
        from flwr.app import Context, RecordDict
        from flwr.common.config import get_fused_config_from_dir
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
        from flwr.simulation.run_simulation import _run_simulation
        from flwr.supercore.constant import NOOP_FEDERATION_ID
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity
        from flwr.supercore.telemetry import EventType

        overrides = parse_overrides(overrides_text(run_config))
        run = Run.create_empty(run_id=generate_rand_int_from_bytes(8))
        run.override_config, run.federation_id = overrides, NOOP_FEDERATION_ID
        run.primary_task_id = generate_rand_int_from_bytes(8)
        # the ServerApp's messages come from the SuperLink's node, as in `flwr-simulation` (the grid checks it)
        TaskIdentity.task_id, TaskIdentity.run_id = run.primary_task_id, run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(),
                          run_config=get_fused_config_from_dir(app_dir, overrides))
        with prompt_pump():  # each message reaches its site at once, not at Flower's next 0.1 s sweep
            _run_simulation(num_supernodes=num_supernodes, exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE,
                            server_app_attr=components["serverapp"], client_app_attr=components["clientapp"],
                            server_app_context=context, app_dir=str(app_dir), run=run, is_app=True)
    except BaseException as exc:  # noqa: BLE001  # reported by finish's caller through the ServerApp's absent end
        outcome["error"] = exc
        logging.getLogger("flwr").error("radfed: the simulation ended with %s: %s", type(exc).__name__, exc)


@contextmanager
def in_process_federation(run_config: Mapping[str, object], num_supernodes: int, flwr_home: Path,
                          app_dir: Path = APP_DIR, echo: bool = True, cpus_per_node: int = 1,
                          gated: bool = False) -> Iterator[InProcessFederation]:
    """``started_federation`` without Flower's processes: the simulation runs in a thread of this process
    (``_simulate``), its ClientApps in one worker process per ``cpus_per_node`` cores (``process_backend``); Flower's
    log goes to stdout (``echo``) or ``<flwr_home>/flwr-run.log``. The workers are stopped on leaving: at once when
    the ServerApp announced its end, else once the simulation has ended (bounded). The caller's process ends soon
    after (the demo's: ``exit_now``)."""
    import flwr.supercore.telemetry as telemetry
    from flwr.common.config import get_project_config
    from flwr.supercore.logger import console_handler

    flwr_home.mkdir(parents=True, exist_ok=True)
    gate = flwr_home.resolve() / "start-gate" if gated else None
    if gate is not None:
        gate.unlink(missing_ok=True)
    end_mark = flwr_home.resolve() / "run-end"
    end_mark.unlink(missing_ok=True)
    app_dir = app_dir.resolve()
    components = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]
    # this process is the simulation's now: what Flower's processes got in their environment (flwr_env), it gets here
    saved_env = {k: os.environ.get(k) for k in (*FLWR_QUIET, *WORKER_ENV, START_GATE, RUN_END_MARK, "FLWR_HOME")}
    os.environ.update({**FLWR_QUIET, **WORKER_ENV, RUN_END_MARK: str(end_mark), "FLWR_HOME": str(flwr_home),
                       **({START_GATE: str(gate)} if gate else {})})
    telemetry.FLWR_TELEMETRY_ENABLED = "0"  # read when Flower was imported (the plan's hash may have imported it)
    saved_stream = console_handler.stream
    outcome: dict[str, object] = {}
    with ExitStack() as stack:
        out = sys.stdout if echo else stack.enter_context((flwr_home / "flwr-run.log").open("a", encoding="utf-8"))
        console_handler.setStream(out)
        try:
            workers = max(1, (os.cpu_count() or 1) // cpus_per_node)
            stack.enter_context(process_backend(components["clientapp"], app_dir, flwr_home, workers,
                                                       num_supernodes))
            nice = BOOT_NICE if gated else 0  # booting beside the extraction: it keeps its cores
            thread = threading.Thread(target=_simulate, name="radfed-simulation", daemon=True,
                                      args=(run_config, num_supernodes, app_dir, components, outcome, nice))
            thread.start()
            yield InProcessFederation(thread, outcome, flwr_home, gate, end_mark)
            if not end_mark.exists():  # the simulation is ending without the ServerApp's last lines: its log says why
                thread.join(END_JOIN)
            # Else every output is written, and what is left of the simulation is its wind-down: about 1 s, as its
            # workers wait up to 1 s on their queue (vce_api.worker) before they see the stop. Leaving
            # process_backend stops the ClientApp workers now, and the simulation's thread (a daemon) ends with
            # this process.
        finally:
            console_handler.setStream(saved_stream)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# Seconds the in-process simulation gets to end when the ServerApp did not announce its end
END_JOIN = 10.0

"""Shared fixtures: tiny synthetic sites written with the real generator and SimpleITK."""

import locale
import signal
from pathlib import Path

import pytest
import ray_head

from radfed import synth


@pytest.fixture(scope="session")
def tiny_site_root(tmp_path_factory) -> Path:
    """One tiny site with 12 cases of each class: two release blocks of k = 5 per class, with room for two broken
    cases."""
    root = tmp_path_factory.mktemp("tiny")
    synth.write_site(root, synth.tiny_sites(1, 12)[0], seed=11)
    return root


@pytest.fixture
def server_identity():
    """Flower's Message constructor reads the task's identity, which the ServerApp runtime sets; tests that build
    the coordinator's messages set it by hand (Flower's internal API) and restore it after."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


@pytest.fixture(autouse=True)
def _locale_of_the_environment():
    """Each test starts in the environment's locale: a library that switches the process to the C locale (ASCII)
    would otherwise make the next test's text subprocess output undecodable."""
    locale.setlocale(locale.LC_ALL, "")
    yield


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


@pytest.fixture(scope="session", autouse=True)
def _stop_the_shared_ray_head():
    """The Ray head simulated federations share (tests/ray_head.py), if one started, stops with the session; also
    when the session is stopped by SIGTERM (a CI timeout, `timeout`): pytest then unwinds as on Ctrl-C, so the
    running test's SuperLink (radfed.launch) and this head are stopped by their process groups, not left behind."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        ray_head.stop()

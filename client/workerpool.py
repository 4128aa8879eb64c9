"""A process pool whose workers never outlive the block that uses it.

SIGTERM's default action would end the parent at once and orphan its workers, which then wait for work
forever. Inside ``worker_pool`` SIGTERM raises SystemExit in the parent (exit status 128 + 15), and any
exception (that, Ctrl-C, an error) cancels the queued jobs and terminates the workers; each worker calls
``prepare_worker`` first, so the kernel ends it when the parent dies, even by SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import process as futures_process
from contextlib import contextmanager
from types import FrameType


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel sends this process SIGTERM when its parent dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def prepare_worker(parent: int) -> None:
    """In a worker, first: die with the parent, and leave Ctrl-C and SIGTERM to it."""
    # Ctrl-C reaches the whole process group: the parent stops the pool, workers need not print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked worker inherits the parent's SIGTERM handler (raise SystemExit), which the pool's worker loop
    # would catch as a job's error: terminate() must kill.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent)


def itk_worker(threads: int, parent: int) -> None:
    """A worker whose ITK filters use ``threads`` threads: ITK defaults to one per core, which workers side by side
    already fill (their threads only contend: the demo's 4 sites, 2 at a time on 2 cores, extracted 2 to 11% sooner
    on one each)."""
    prepare_worker(parent)
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued cases and terminate the workers now (shutdown alone would finish every queued case)."""
    # the pool keeps no public handle on its workers; snapshot before shutdown() drops the private one
    processes = list((getattr(pool, "_processes", None) or {}).values())
    manager = getattr(pool, "_executor_manager_thread", None)
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
    # join the pool's manager thread now that its workers are gone, and drop it from concurrent.futures' exit
    # hook: that hook wakes every manager it still knows through a pipe this shutdown closed, and would print a
    # traceback after a clean SIGTERM exit (CPython 3.11, seen under load)
    pool.shutdown(wait=True)
    wakeups = getattr(futures_process, "_threads_wakeups", None)
    if manager is not None and wakeups is not None:
        wakeups.pop(manager, None)


@contextmanager
def worker_pool(workers: int, initializer: Callable[..., None], initargs: tuple[object, ...]
                ) -> Iterator[ProcessPoolExecutor]:
    """A process pool whose workers never outlive the block.

    SIGTERM's default action ends this process at once and orphans the workers, which then wait for work
    forever. While the pool runs (in the main thread), SIGTERM raises SystemExit instead, and any exception
    (SystemExit, Ctrl-C's KeyboardInterrupt, an error) cancels the queued jobs and terminates the workers.
    """
    # the initializer gets this process's pid last: prepare_worker(parent) makes the worker die with it
    pool = ProcessPoolExecutor(max_workers=workers, initializer=initializer, initargs=(*initargs, os.getpid()))
    main_thread = threading.current_thread() is threading.main_thread()  # signals can be set there only
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        yield pool
    except BaseException:
        _stop_pool(pool)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

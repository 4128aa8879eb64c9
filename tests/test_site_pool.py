"""The demo's and the benches' pool of whole-site extractions: ITK's threads share the cores between its processes
(ITK's default, one per core in each process, made 2 sites at once on 2 cores slower), and no process outlives it."""

from __future__ import annotations

import os

import pytest
import SimpleITK as sitk

from radfed.cli.coordinator import site_pool


def _itk_threads(_job: int) -> tuple[int, int]:
    return os.getpid(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()


@pytest.mark.parametrize("workers", [1, 2])
def test_each_process_gets_its_share_of_the_cores_and_ends_with_the_pool(workers):
    cores = os.cpu_count() or 1
    with site_pool(workers) as pool:
        got = dict(pool.map(_itk_threads, range(4 * workers)))
    assert set(got.values()) == {max(1, cores // workers)}
    assert os.getpid() not in got  # run in the pool's processes, not here
    for pid in got:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # ended (and reaped) when the block closed

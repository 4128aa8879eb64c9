"""A site is loaded once per run (client.runcache) yet sees every change to its files: real site folders, real
extraction, radfed's ClientApp with all its mods driven by real Flower messages (bench/site_messages.py)."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from site_helpers import extracted_site, settled_copy

from bench.site_messages import SiteHarness
from client import runcache, steps
from client.approvals import decide, site_plan
from client.extract import features_path
from client.site import load_site
from common.plan import plan_sha256
from common.profile import load_profile
from radfed import synth
from radfed.launch import app_run_config

CONFIG = {"min-cases-per-class": 5}
FULL = app_run_config(CONFIG)  # the complete run config a site gets


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    return extracted_site(tmp_path_factory.mktemp("runcache"), 5, FULL)


@pytest.fixture
def site(extracted, tmp_path) -> Path:
    yield settled_copy(extracted, tmp_path)
    runcache.clear()


def _content(reply) -> dict:
    """A reply's arrays (exact bytes) and metrics."""
    return {"arrays": {k: v.numpy().tobytes() for k, v in reply.content["arrays"].items()},
            "metrics": dict(reply.content["metrics"])}


def _train_case(site: Path) -> str:
    data = steps.load_site_data(site, FULL)
    return data.table.case_ids[int(np.flatnonzero(~data.held_out)[0])]


def test_cached_replies_are_bit_identical_to_reloading_every_message(site):
    harness = SiteHarness(site, CONFIG)
    cached = [_content(harness.train()) for _ in range(3)]
    assert ("site", (str(site.resolve()), "default", "", "")) in {k for k in runcache._ENTRIES}  # the cache was used
    reloaded = []
    for _ in range(3):
        harness.forget()
        reloaded.append(_content(harness.train()))
    assert cached == reloaded


def test_unchanged_files_are_not_rewritten_by_a_reload(site):
    harness = SiteHarness(site, CONFIG)
    csv_path = features_path(load_site(site, load_profile().sequences), load_profile())
    before = {p: runcache.stamp(p) for p in (csv_path, csv_path.with_suffix(".json"), site / ".radfed/errors.json")}
    harness.forget()
    harness.train()
    assert {p: runcache.stamp(p) for p in before} == before


def test_a_changed_image_between_two_messages_is_read_again(site):
    harness = SiteHarness(site, CONFIG)
    first = _content(harness.train())
    case = _train_case(site)
    with (site / "manifest.csv").open(encoding="utf-8") as fh:
        row = next(r for r in csv.DictReader(fh) if r["case_id"] == case)
    for seq in synth.SEQUENCES:  # a brighter scan of one training case: its features change
        path = site / row[seq]
        image = sitk.ReadImage(str(path))
        sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32) * 1.7 + 40.0, str(path))
    after = _content(harness.train())
    harness.forget()
    assert after != first
    assert after == _content(harness.train())  # what a site reloading every message sends


def test_a_manifest_without_a_case_is_read_again(site):
    harness = SiteHarness(site, CONFIG)
    harness.train()
    case = _train_case(site)
    lines = (site / "manifest.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (site / "manifest.csv").write_text("".join(x for x in lines if not x.startswith(case + ",")), encoding="utf-8")
    # the case's frozen release block lost a member: its other patients leave the run, and a class is then too
    # small for two blocks, as a site reloading every message finds
    refusal = "cannot take part: its usable (HGG|BM) cases form fewer than two release blocks"
    with pytest.raises(RuntimeError, match=refusal):
        harness.train()
    harness.forget()
    with pytest.raises(RuntimeError, match=refusal):
        harness.train()


def test_a_plan_revoked_between_two_messages_is_refused(site):
    harness = SiteHarness(site, CONFIG)  # approves the plan
    time.sleep(2 * runcache.SETTLE_FINE_NS / 1e9)  # an approval older than the settling time: the cache keeps it
    harness.train()
    harness.train()  # approved: every message passes, the second from the cache
    assert any(kind == "approvals" for kind, _ in runcache._ENTRIES)
    plan_hash = plan_sha256(site_plan(steps.run_config(FULL)))
    decide(site, plan_hash, "revoke")
    with pytest.raises(RuntimeError, match=f"revoked run plan {plan_hash}"):
        harness.train()


def test_a_ledger_changed_between_two_messages_draws_the_split_again(site):
    harness = SiteHarness(site, CONFIG)
    harness.train()  # records the training set: the ledger changes
    time.sleep(2 * runcache.SETTLE_FINE_NS / 1e9)  # the ledger older than the settling time: the split is kept
    before = _content(harness.train())
    assert any(kind == "split" for kind, _ in runcache._ENTRIES)
    # the site's administrator starts its ledger again with another secret: its blocks, so its split, are drawn anew
    release = site / ".radfed" / "release"
    for name in ("ledger.json", "releases.jsonl"):
        (release / name).unlink()
    (release / "secret").write_text("5a" * 32)
    after = _content(harness.train())
    harness.forget()
    assert after != before
    assert after == _content(harness.train())  # what a site drawing its split every message sends


def test_a_file_settles_after_its_clock_tick_or_two_seconds_when_stamped_in_whole_seconds(tmp_path, monkeypatch):
    """The settling rule (runcache.has_settled): a stamp with a fraction of a second (a file system on the kernel's
    clock) is trusted SETTLE_FINE_NS after its last change, one in whole seconds (ext3, HFS+, FAT) only after
    SETTLE_NS; an entry made from a file within its settling time is not kept, one made after it is."""
    now = time.time_ns()
    fine, coarse = now - now % 1_000_000_000 + 123, now - now % 1_000_000_000
    assert not runcache.has_settled((1, 1, fine, fine), fine + runcache.SETTLE_FINE_NS - 1)
    assert runcache.has_settled((1, 1, fine, fine), fine + runcache.SETTLE_FINE_NS + 1)
    assert not runcache.has_settled((1, 1, fine - 10**9, fine), fine + runcache.SETTLE_FINE_NS - 1)  # ctime counts
    assert not runcache.has_settled((1, 1, coarse, coarse), coarse + runcache.SETTLE_FINE_NS + 1)
    assert not runcache.has_settled((1, 1, coarse, coarse), coarse + runcache.SETTLE_NS - 1)
    assert runcache.has_settled((1, 1, coarse, coarse), coarse + runcache.SETTLE_NS + 1)
    assert runcache.has_settled(None, now)

    path = tmp_path / "watched.txt"
    path.write_text("one")
    made = []

    def value() -> str:
        made.append(1)
        return path.read_text()

    with monkeypatch.context() as patch:  # within its settling time however slow this machine is: made each time
        patch.setattr(runcache, "SETTLE_FINE_NS", 3600 * 10**9)
        for _ in range(2):
            runcache.remember("test", "fresh", value, lambda _: [path])
    assert len(made) == 2
    time.sleep(2 * runcache.SETTLE_FINE_NS / 1e9)
    for _ in range(2):  # settled: kept after one more make
        runcache.remember("test", "fresh", value, lambda _: [path])
    assert len(made) == 3
    path.write_text("two")
    assert runcache.remember("test", "fresh", value, lambda _: [path]) == "two"
    runcache.clear()

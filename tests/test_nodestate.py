"""A site's large run state (agreed name lists, ComBat parameters) lives in its run folder and process memory by
hash, Flower's context.state holding the hashes (client.nodestate): the node answers the same in a fresh process
(a restart, or another Ray actor of the simulation), and a stored list or parameter file that changed or went
missing is refused, through the real guard."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from site_helpers import agreed_node, combat_join

from client import combat_state, nodestate
from client.guard import agreed_sizes, site_state_key
from client.site import SiteError

ROOT = Path(__file__).resolve().parent.parent


def _join(ctx: Context, names: list[str], fold: str) -> Message:
    """A leave-one-site-out fold's ComBat join (the site agrees the fold's feature list and keeps its parameters)."""
    rng = np.random.default_rng(len(fold))
    return combat_join(ctx, names, fold, rng.normal(size=len(names)), rng.uniform(0.5, 2, len(names)))


def _joined(tmp_path: Path) -> tuple[Context, list[str]]:
    """A node that agreed its features and joined two folds' ComBat."""
    ctx, names = agreed_node(tmp_path)
    for fold in ("a", "b"):
        sent = _join(ctx, names, fold)
        assert not sent.has_error(), sent.error.reason
    return ctx, names


_FRESH = """
import json, pickle, sys
import numpy as np
from client import combat_state, nodestate
from client.guard import agreed_sizes
ctx = pickle.loads(open(sys.argv[1], "rb").read())
x = np.load(sys.argv[2])
print(json.dumps({"d": agreed_sizes(ctx, "a")["d"],
                  "adjusted": combat_state.kept(nodestate.of(ctx), "a")(x, None).tolist()}))
"""


def test_a_fresh_process_reads_what_the_node_agreed_from_its_run_folder(tmp_path):
    """The context as Flower ships it (pickled) is small; a new process (a restarted node, another Ray actor) given it
    finds the same agreed sizes and applies the same ComBat parameters, to the bit."""
    ctx, names = _joined(tmp_path)
    shipped = pickle.dumps(ctx)
    assert len(pickle.dumps(ctx.state)) < 2000, "the state should hold hashes, not the lists and parameters"
    x = np.random.default_rng(0).normal(size=(6, len(names)))
    here = combat_state.kept(nodestate.of(ctx), "a")(x, None)
    (tmp_path / "ctx.pkl").write_bytes(shipped)
    np.save(tmp_path / "x.npy", x)
    out = subprocess.run([sys.executable, "-c", _FRESH, str(tmp_path / "ctx.pkl"), str(tmp_path / "x.npy")],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there["d"] == len(names) == agreed_sizes(ctx, "a")["d"]
    assert np.array_equal(np.array(there["adjusted"]), here)
    # and in this process once it forgot everything (as another actor): a fold's message is answered as before
    nodestate.clear()
    again = _join(pickle.loads(shipped), names, "a")
    assert not again.has_error(), again.error.reason


def test_a_changed_or_missing_stored_list_is_refused(tmp_path):
    """The feature list the node agreed, changed on disk (a name dropped) or removed, is not used: the guard, which
    checks every reply's shapes against it, refuses the fold's reply, naming the file's problem."""
    ctx, names = _joined(tmp_path)
    folder = nodestate.of(ctx).folder
    stored = folder / str(ctx.state[site_state_key("a")]["features"]).split(":", 1)[1]
    stored.write_text(json.dumps(names[1:]), encoding="utf-8")
    nodestate.clear()  # a fresh process: nothing in memory, the file is what it reads
    refused = _join(ctx, names, "a")
    assert refused.has_error() and "changed on disk" in refused.error.reason
    stored.unlink()
    refused = _join(ctx, names, "b")  # the same list: the other fold's agreement names it too
    assert refused.has_error() and "no longer holds the features list" in refused.error.reason


def test_memory_holds_at_most_its_budget_and_a_dropped_blob_is_read_back_from_the_folder(tmp_path, monkeypatch):
    """Blobs beyond the process's memory budget leave it, least recently used first, and come back from the run
    folder, checked against their hash; a blob kept by another node's folder is not this node's."""
    monkeypatch.setattr(nodestate, "MEMORY_BYTES", 3000)
    nodestate.clear()
    node = nodestate.NodeState(RecordDict(), tmp_path / "site-a")
    blobs = [bytes([i]) * 1000 for i in range(5)]
    digests = [node.put(b) for b in blobs]
    assert sorted(p.name for p in node.folder.iterdir()) == sorted(digests)
    assert sum(len(b) for b in nodestate._MEMORY.values()) <= 3000 and digests[0] not in nodestate._MEMORY
    assert [node.get(d, "blob") for d in digests] == blobs  # the first ones read back from the folder
    other = nodestate.NodeState(RecordDict(), tmp_path / "site-b")
    nodestate.clear()
    with pytest.raises(SiteError, match="no longer holds the blob"):
        other.get(digests[0], "blob")


def test_a_new_run_removes_run_folders_last_written_more_than_a_week_ago(tmp_path):
    parent = tmp_path / "run-state"
    stale, recent, other = parent / "run-1", parent / "run-2", parent / "notes"
    for folder in (stale, recent, other):
        folder.mkdir(parents=True)
        (folder / "blob").write_bytes(b"x")
    week_ago = time.time() - nodestate.KEEP_SECONDS - 60
    os.utime(stale, (week_ago, week_ago))
    os.utime(other, (week_ago, week_ago))

    node = nodestate.NodeState(RecordDict(), parent / "run-3")
    digest = node.put(b"the new run's list")

    assert not stale.exists()  # older than a week: gone
    assert recent.exists() and other.exists()  # a recent run's folder, and anything not a run's, stay
    assert node.get(digest, "list") == b"the new run's list"
    assert nodestate.prune(parent, keep=parent / "run-3", now=time.time() + nodestate.KEEP_SECONDS + 60) == [recent]
    assert (parent / "run-3").exists()  # the folder in use is never removed


def test_a_list_the_node_already_wrote_is_not_encoded_again_for_another_cohort(tmp_path, monkeypatch):
    """Each leave-one-site-out fold agrees mostly the same ~860 names: the node names the blob it wrote for an earlier
    cohort by its hash instead of encoding the list again; a node that does not hold it (a fresh process) still
    writes it, and every cohort reads the same list back."""
    from client import guard
    from common.canon import sha256_json

    nodestate.clear()
    encoded = []
    real = guard.canonical_json
    monkeypatch.setattr(guard, "canonical_json", lambda value: encoded.append(1) or real(value))
    node = nodestate.NodeState(RecordDict(), tmp_path / "run-1")
    names = [f"feature-{i}" for i in range(50)]
    records = [ConfigRecord() for _ in range(3)]  # three cohorts' agreements
    for record in records:
        guard.keep_names(node, record, "features", names, sha256_json(names))
    assert len(encoded) == 1
    nodestate.clear()  # another process: it does not know the folder holds the blob, so it writes it (same bytes)
    fresh = ConfigRecord()
    guard.keep_names(node, fresh, "features", names, sha256_json(names))
    assert len(encoded) == 2
    assert all(guard.agreed_names(node, r, "features") == names for r in [*records, fresh])


def test_a_run_folder_is_made_once_per_process(tmp_path, monkeypatch):
    """~2,300 fold blobs per site process at 48 sites: the run folder is checked and made once, not per blob; each
    blob is still written whole under its hash, with write_bytes' mode."""
    nodestate.clear()
    (tmp_path / "run-state").mkdir()  # the runs' parent, as after an earlier run
    made = []
    real = Path.mkdir
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: (made.append(self), real(self, *a, **k))[1])
    node = nodestate.NodeState(RecordDict(), tmp_path / "run-state" / "run-1")
    blobs = [bytes([i]) * 1000 for i in range(5)]
    digests = [node.put(b) for b in blobs]
    assert made == [node.folder]
    for b, d in zip(blobs, digests, strict=True):
        assert (node.folder / d).read_bytes() == b
        probe = tmp_path / "probe"
        probe.write_bytes(b"")
        assert (node.folder / d).stat().st_mode == probe.stat().st_mode
    assert sorted(p.name for p in node.folder.iterdir()) == sorted(digests)  # no part file left
    nodestate.clear()
    assert nodestate.NodeState(RecordDict(), node.folder).get(digests[0], "blob") == blobs[0]

"""What a site keeps in Flower's node state during a run stays small: each agreed name list is kept once, under its
hash, in the site's run folder (client.nodestate), whatever the number of folds that agreed it, and the state names
the hashes, while the guard still checks every fold's shapes against that fold's own list (client.guard.keep_names;
the simulation ships the state with every message)."""

from __future__ import annotations

import json
import pickle
import time

import numpy as np
from site_helpers import agreed_node, combat_join

from client import nodestate
from client.guard import agreed_sizes, site_state_key
from common import protocol
from radfed import synth
from radfed.launch import app_run_config


def test_folds_agreeing_the_same_features_keep_one_list_and_their_own_sizes(tmp_path):
    ctx, names = agreed_node(tmp_path)

    def join(d: int, fold: str) -> None:
        sent = combat_join(ctx, names[:d], fold, np.zeros(d), np.ones(d))
        assert not sent.has_error(), sent.error.reason

    for fold in ("a", "b", "c"):
        join(len(names), fold)
    join(4, "d")
    kept = {str(ctx.state[site_state_key(f)]["features"]) for f in "abcd"}  # each fold's list, by hash
    folder = nodestate.of(ctx).folder
    assert sorted(len(json.loads((folder / k.split(":", 1)[1]).read_bytes())) for k in kept) == [4, len(names)]
    assert len(pickle.dumps(ctx.state)) < 4000  # four folds' lists and ComBat parameters: hashes only
    assert {f: agreed_sizes(ctx, f)["d"] for f in "abcd"} == {"a": len(names), "b": len(names), "c": len(names),
                                                              "d": 4}
    assert all(len(pickle.dumps(ctx.state[site_state_key(f)])) < 1000 for f in "abcd")  # no copy of the names


def test_a_batch_draws_its_split_again_only_when_a_sub_reply_froze_a_block(tmp_path):
    """Inside a batch the split is drawn from the ledger with the batch's booked releases: kept from one sub-request
    to the next while they freeze nothing, drawn again once one froze a block (client.steps.load_site_data)."""
    from client import ledger, runcache, steps

    site = synth.write_site(tmp_path / "sites", synth.tiny_sites(1, 12)[0], seed=5)
    run = steps.run_config(app_run_config({"data-root": str(site.parent), "min-cases-per-class": 5}))
    steps.load_site_data(site, run)  # extracted now: kept once its files are older than the cache's settling time
    time.sleep(2 * runcache.SETTLE_FINE_NS / 1e9)
    runcache.clear()
    with runcache.one_look(), ledger.deferred():
        first = steps.load_site_data(site, run)
        assert steps.load_site_data(site, run) is first  # nothing frozen yet: the same draw
        book = steps.ledger(first.site)
        assert book.frozen_blocks() == 0
        book.record(1, protocol.MOMENTS, first.case_sets("train"), first.blocking)  # booked in memory, not written
        assert book.frozen_blocks() > 0
        again = steps.load_site_data(site, run)
        assert again is not first and np.array_equal(again.held_out, first.held_out)  # drawn again, same blocks
        assert steps.load_site_data(site, run) is again
    assert not (site / ".radfed" / "release" / "ledger.json").exists()  # the batch was never written

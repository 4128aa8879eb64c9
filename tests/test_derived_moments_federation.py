"""Leave-one-site-out folds whose moments and selection correlation the coordinator works out from what the sites
sent for the main run (issue 20, ``loso-derived-moments``, server/derived_moments.py), in a real simulated
federation: the same fold results as asking every site, with no fold moments query and, where a fold's selection
reads only the main run's candidates, no correlation query. That a fold still learns nothing of
its held-out site is tests/test_federation.py::test_leave_one_site_out_learns_nothing_from_the_held_out_site (on
by default there)."""

from __future__ import annotations

import json

import numpy as np
from federation_helpers import events, numbers, switched_runs

from radfed import synth


def test_derived_fold_moments_and_correlation_equal_asked_ones_with_no_query(tmp_path):
    root, runs, docs = switched_runs(tmp_path, 3, 940, "loso-derived-moments")
    specs = synth.tiny_sites(3, 12)

    # the same fold results, to rounding: every fold's chosen features and every validation number
    def chosen(folder):
        return {e["data"].get("fold", ""): e["data"]["features"] for e in events(folder) if e["event"] == "selection"}
    assert chosen(runs[True]) == chosen(runs[False]) and len(chosen(runs[True])) == 4
    derived, asked = numbers(docs[True]["validation"]), numbers(docs[False]["validation"])
    assert len(derived) == len(asked) > 20
    np.testing.assert_allclose(derived, asked, rtol=1e-9, atol=1e-12)
    assert docs[True]["model_sha256"] == docs[False]["model_sha256"]  # the main run is the same run

    # every fold's moments were worked out, none asked; each site asked once (the main run, with its per-class
    # moments before ComBat) and kept its ComBat for each fold it trains in, riding with the fold's next query
    moments = {d: [e["data"] for e in events(f) if e["event"] == "moments" and e["data"].get("fold")]
               for d, f in runs.items()}
    assert len(moments[True]) == len(moments[False]) == 3
    assert all("derived" in m for m in moments[True]) and not any("derived" in m for m in moments[False])
    # on these tiny sites one fold's decorrelation walk stays among the main run's candidates (its correlation
    # worked out) and two leave them (asked): both paths, with the same results as above
    selections = {d: {e["data"]["fold"]: e["data"] for e in events(f)
                      if e["event"] == "selection" and e["data"].get("fold")} for d, f in runs.items()}
    derived_folds = {fold for fold, e in selections[True].items() if "derived" in e}
    assert len(derived_folds) == 1 and not any("derived" in e for e in selections[False].values())
    folds_of = {spec.name: [s.name for s in specs if s.name != spec.name] for spec in specs}
    for spec in specs:
        sent = {d: [json.loads(line) for line in (root / spec.name / ".radfed" / "outbox.jsonl").read_text(
            encoding="utf-8").splitlines() if json.loads(line)["run_id"] == docs[d]["run_id"]] for d in runs}
        kinds = {d: [e["type"] for e in s] for d, s in sent.items()}
        assert (kinds[True].count("query.moments"), kinds[True].count("query.combat_keep")) == (1, 2)
        assert (kinds[False].count("query.moments"), kinds[False].count("query.combat_keep")) == (3, 0)
        [main] = [e for e in sent[True] if e["type"] == "query.moments"]
        assert {"raw-mean-hgg", "raw-m2-hgg", "raw-mean-bm", "raw-m2-bm"} <= set(main["records"]["arrays"])
        assert not any(k.startswith("raw-") for e in sent[False] if e["type"] == "query.moments"
                       for k in e["records"]["arrays"])
        # the correlation: asked by the main run (with the candidates' cross-products before ComBat), and by a fold
        # only when its walk left the main run's candidates
        assert kinds[True].count("query.correlation") == 1 + sum(f not in derived_folds for f in folds_of[spec.name])
        assert kinds[False].count("query.correlation") == 3
        correlations = {d: [e["records"]["arrays"] for e in s if e["type"] == "query.correlation"]
                        for d, s in sent.items()}
        assert set(correlations[True][0]) == {"crossproducts", "raw-crossproducts"}  # the main run's
        assert all(set(a) == {"crossproducts"} for a in correlations[False] + correlations[True][1:])
    ends = {d: [e["data"] for e in events(f) if e["event"] == "folds-end"] for d, f in runs.items()}
    assert ends[True][0]["rounds"] == ends[False][0]["rounds"] - 1  # a fold that asked for its correlation
    # a keep for each moments request, and no correlation request at the 2 sites of a fold that worked it out
    assert ends[True][0]["requests"] == ends[False][0]["requests"] - 2 * len(derived_folds)
    # each site kept its fold ComBat for the features the fold harmonises there alone: the chosen 3 where the fold
    # worked its correlation out, the candidates it asked about otherwise (~0.3 KB, not 35 KB, per fold at 861)
    kept = sorted(len(head["columns"]) for spec in specs
                  for head in _combat_heads(root / spec.name / ".radfed" / "run-state" / f"run-{docs[True]['run_id']}")
                  if head["columns"] is not None)
    candidates = {e["candidates"] for e in selections[True].values() if "derived" not in e}
    assert kept == sorted([3] * 2 * len(derived_folds) + [*candidates] * 2 * (3 - len(derived_folds)))
    assert all(c > 3 for c in candidates)


def _combat_heads(folder):
    """The headers of the ComBat parameters a site's node kept for the run (client/combat_state.py ``pack``)."""
    heads = []
    for path in folder.iterdir():
        blob = path.read_bytes()
        size = int.from_bytes(blob[:4], "big")
        try:
            head = json.loads(blob[4:4 + size])
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # another kept thing (a name list)
        if isinstance(head, dict) and "gamma_star" not in head and {"d", "p", "columns"} <= set(head):
            heads.append(head)
    return heads

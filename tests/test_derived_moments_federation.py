"""Leave-one-site-out folds whose moments the coordinator works out from what the sites sent for the main run
(issue 20, ``loso-derived-moments``, server/derived_moments.py), in a real simulated federation: the same fold
results as asking every site, with no fold moments query and one round fewer. That a fold still learns nothing of
its held-out site is tests/test_federation.py::test_leave_one_site_out_learns_nothing_from_the_held_out_site (on
by default there)."""

from __future__ import annotations

import json

import numpy as np
from federation_helpers import events, numbers, run_federation_in

from radfed import synth


def test_derived_fold_moments_equal_asked_ones_with_no_moments_query(tmp_path):
    root = tmp_path / "data"
    specs = synth.tiny_sites(3, 12)
    for i, spec in enumerate(specs):
        synth.write_site(root, spec, seed=940 + i)
    config = {"training": "exact", "select-features": 3, "external-validation": "loso", "local-only": "none"}
    runs = {derived: run_federation_in(tmp_path / str(derived), root, 3, **config,
                                       **{"loso-derived-moments": derived}) for derived in (True, False)}
    docs = {d: json.loads((f / "metrics.json").read_text(encoding="utf-8")) for d, f in runs.items()}
    assert docs[True]["status"] == docs[False]["status"] == "completed", docs[True].get("error")

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
    ends = {d: [e["data"] for e in events(f) if e["event"] == "folds-end"] for d, f in runs.items()}
    assert ends[True][0]["rounds"] == ends[False][0]["rounds"] - 1
    assert ends[True][0]["requests"] == ends[False][0]["requests"]  # a keep for each moments request

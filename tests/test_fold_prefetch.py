"""The leave-one-site-out folds' first steps worked out while the main run waits (``loso-prefetch``,
server/fold_prefetch.py), in a real simulated federation: every fold starts from them, and the run is the same to
the bit as when each fold works them out at its start: the same features, models, validation numbers and audit
entries (but for the note saying so)."""

from __future__ import annotations

from federation_helpers import events, numbers, switched_runs


def _entries(folder) -> list[tuple[str, dict]]:
    """The audit entries from the features agreed on, without what differs between any two runs (times, hashes of
    the run's own paths and ids) and without the prefetch's note."""
    out, seen = [], False
    for e in events(folder):
        seen = seen or e["event"] == "features-agreed"
        if not seen or e["event"] in ("folds-end", "run-end"):
            continue  # folds-end holds the coordinator's own timings; run-end the run's artifact hashes
        data = {k: v for k, v in e["data"].items() if k != "ahead"}
        out.append((e["event"], data))
    return out


def test_folds_started_from_their_prefetched_first_steps_are_the_same_run(tmp_path):
    _, runs, docs = switched_runs(tmp_path, 3, 970, "loso-prefetch")

    # every fold pooled its sites' ComBat from what the thread worked out (the main run takes seconds more, the
    # thread milliseconds per fold), and the audit says so; never without the switch
    notes = {on: [e["data"].get("ahead") for e in events(f) if e["event"] == "harmonization" and e["data"].get("fold")]
             for on, f in runs.items()}
    assert len(notes[True]) == len(notes[False]) == 3
    assert all(notes[True]) and not any(notes[False])

    # the same run to the bit: validation numbers, every model, every audit entry in order
    assert numbers(docs[True]["validation"]) == numbers(docs[False]["validation"])
    assert len(numbers(docs[True]["validation"])) > 20
    assert docs[True]["model_sha256"] == docs[False]["model_sha256"]
    assert _entries(runs[True]) == _entries(runs[False])

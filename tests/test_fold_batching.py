"""Every fold in the same rounds (fold-batching, issue 20): the leave-one-site-out folds, the local-only baselines and
the cross-validation folds of a real simulated run give results identical to running them one by one, with fewer
Flower messages."""

from __future__ import annotations

import json
from pathlib import Path

from federation_helpers import events, run_federation_in

from radfed import synth

FOLD_EVENTS = ("fold-start", "folds-end")  # how the folds were run, not what they found


def _by_fold(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """Each fold's audit entries in order (event and data), without the entries that say how folds were run."""
    out: dict[str, list[tuple[str, str]]] = {}
    for e in events(folder):
        fold = e["data"].get("fold")
        if fold and e["event"] not in FOLD_EVENTS:
            out.setdefault(fold, []).append((e["event"], json.dumps(e["data"], sort_keys=True)))
    return out


def test_batched_folds_equal_sequential_folds_with_fewer_messages(tmp_path):
    root = tmp_path / "data"
    for i, spec in enumerate(synth.tiny_sites(3, 12)):
        synth.write_site(root, spec, seed=900 + i)
    config = {"training": "exact", "select-features": 3, "external-validation": "loso", "local-only": "own-pipeline",
              "internal-validation": "cv", "cv-folds": 2, "cv-repeats": 1}
    runs = {mode: run_federation_in(tmp_path / mode, root, 3, **config, **{"fold-batching": mode == "batched"})
            for mode in ("batched", "sequential")}
    docs = {mode: json.loads((f / "metrics.json").read_text(encoding="utf-8")) for mode, f in runs.items()}
    assert docs["batched"]["status"] == docs["sequential"]["status"] == "completed", docs["batched"].get("error")

    # the same fold results: metrics, intervals, curves, features, and every model hash in the audit log
    assert docs["batched"]["validation"] == docs["sequential"]["validation"]
    folds = {mode: _by_fold(f) for mode, f in runs.items()}
    sites = sorted(docs["batched"]["sites"])
    assert sorted(folds["batched"]) == sorted([*sites, *(f"local:{s}" for s in sites), "cv:0:0", "cv:0:1"])
    assert folds["batched"] == folds["sequential"]
    hashes = [d for entries in folds["batched"].values() for event, d in entries
              if event in ("external-validation", "local-only", "cross-validation")]
    assert len(hashes) == 8 and all('"model_sha256"' in d for d in hashes)

    # fewer messages: one per site per round of all folds together, instead of one per site per fold's round
    ends = {mode: [e["data"] for e in events(f) if e["event"] == "folds-end"] for mode, f in runs.items()}
    assert [e["batched"] for e in ends["batched"]] == [True, True]  # cross-validation, then loso + local-only
    assert [e["batched"] for e in ends["sequential"]] == [False, False]
    for batched, sequential in zip(ends["batched"], ends["sequential"], strict=True):
        assert batched["folds"] == sequential["folds"]
        assert batched["requests"] == sequential["requests"]  # every request still went, packed
        assert 2 * batched["messages"] <= sequential["messages"], (batched, sequential)
    # `radfed status` reads the batched fold-start: every fold at once
    starts = [e["data"] for e in events(runs["batched"]) if e["event"] == "fold-start"]
    assert [s["of"] for s in starts] == [2, 6] and starts[1]["kind"] == "leave-one-site-out + local-only"

"""What an honest-but-curious coordinator learns about one site's patients across runs, and what the release
ledger costs.

    python bench/bench_release.py [--before /path/to/older/checkout] [--work DIR]

Every attack of bench/attacks.py is replayed through the site's real ClientApp on a synthetic site (24 cases
per class), with this checkout's code and, with ``--before``, with an older checkout's (run in a subprocess
with that checkout first on the path), and scored against the site's true features. Then the ledger's cost:
the guard's check per new case set and per message, as the ledger grows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = Path(__file__).with_name("attacks.py")
PER_CLASS = 24


def _attacks():
    """bench/attacks.py by path: the code under test (client, common, radfed) comes from sys.path."""
    spec = importlib.util.spec_from_file_location("radfed_attacks", ATTACKS)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  # dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _fresh_site(work: Path, name: str) -> Path:
    from radfed import synth

    return synth.write_site(work / name, synth.tiny_sites(1, PER_CLASS)[0], seed=5)


def _truth(site: Path, names: list[str], config: dict) -> tuple[dict[str, np.ndarray], object]:
    from client.steps import load_site_data
    from radfed.launch import app_run_config

    data = load_site_data(site, app_run_config({"data-root": str(site.parent), **config}))
    return dict(zip(data.table.case_ids, data.table.columns(names), strict=True)), data


def _members(site: Path, config: dict) -> dict[str, set[str]]:
    _, data = _truth(site, [], config)
    ids = np.array(data.table.case_ids, dtype=object)
    train = ~data.held_out
    return {"hgg": set(ids[train & (data.table.labels == 1)]), "bm": set(ids[train & (data.table.labels == 0)])}


def _set_sex(site: Path, males: set[str]) -> None:
    manifest = site / "manifest.csv"
    header, *rows = (line.split(",") for line in manifest.read_text(encoding="utf-8").splitlines())
    for row in rows:
        row[header.index("sex")] = "M" if row[0] in males else "F"
    manifest.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


def measure(work: Path) -> dict[str, str]:
    """Each attack -> what it yielded, in words."""
    attacks = _attacks()
    out: dict[str, str] = {}
    plain = {"harmonization": "none"}

    site = _fresh_site(work, "fractions")
    coord = attacks.Coordinator(site)
    fractions = [round(0.20 + 0.02 * i, 2) for i in range(15)]
    for fraction in fractions:
        coord.run(**{"test-fraction": fraction, **plain})
    done = [r for r in coord.runs if not r.refused]
    truth, _ = _truth(site, done[0].features, plain) if done else ({}, None)
    hits = [h for h in attacks.subtract_pairs(coord, truth) if h["patient"]] if done else []
    best = min((h["relative_error"] for h in hits), default=None)
    out["test-fraction sweep (15 runs), subtract pairs"] = (
        f"{len({h['patient'] for h in hits})} patient(s) recovered, all {len(done[0].features)} features, "
        f"max rel. error {best:.0e}" if hits else f"none ({len(done)} of {len(fractions)} runs answered)")

    seeds = list(range(30))
    site = _fresh_site(work, "seeds")
    coord = attacks.Coordinator(site)
    for seed in seeds:
        coord.run(**{"split-seed": seed, **plain})
    truth, _ = _truth(site, coord.runs[0].features, plain)
    members = [_members(site, {"split-seed": s, **plain}) for s in seeds]
    solved = attacks.solve_patients(coord, members, truth)
    out["split-seed sweep (30 runs), least squares knowing memberships"] = (
        f"{len(solved)} of {len(truth)} patients recovered, max rel. error {max(solved.values()):.0e}"
        if solved else "none")

    site = _fresh_site(work, "covariates")
    target = sorted(_members(site, plain)["hgg"])[0]
    _set_sex(site, {target})
    coord = attacks.Coordinator(site)
    first = coord.run(**plain)
    truth, _ = _truth(site, first.features, plain)
    names = first.features[:4]
    rows = np.array(list(truth.values()))[:, :4]
    from common import model

    net = model.build_model(rows.mean(axis=0), rows.std(axis=0) + 1e-9)
    state = {"features": names, **{k: v.numpy() for k, v in net.state_dict().items()}}
    coord.runs.clear()
    runs = [coord.run(evaluate_state=state, **plain),
            coord.run(evaluate_state=state, harmonization="combat", **{"combat-covariates": "sex=F|X"})]
    hits = [h for h in attacks.subtract_pairs(coord, truth) if h["patient"]]
    out["covariate filter (sex=F|X drops one man)"] = (
        f"patient {hits[0]['patient']} recovered, max rel. error {hits[0]['relative_error']:.0e}" if hits else
        "none (" + ("; ".join(r.refused[:60] for r in runs if r.refused) or "the filter moved a whole block") + ")")
    if all(not r.refused for r in runs):
        dn = runs[0].evaluation["num-examples"] - runs[1].evaluation["num-examples"]
        out["all-cases evaluation (leave-one-site-out) under that filter"] = (
            f"evaluation sets differ by {dn:.0f} case(s)" + (": that patient's loss, so its score" if dn == 1 else ""))

    site = _fresh_site(work, "duplicates")
    manifest = site / "manifest.csv"
    header, *lines = manifest.read_text(encoding="utf-8").splitlines()
    hgg = next(line for line in lines if line.split(",")[1] == "HGG")
    bm = next(line for line in lines if line.split(",")[1] == "BM")
    clones = [f"h{i}," + hgg.split(",", 1)[1] for i in range(12)] + [f"b{i}," + bm.split(",", 1)[1] for i in range(12)]
    manifest.write_text("\n".join([header, *clones]) + "\n", encoding="utf-8")
    coord = attacks.Coordinator(site)
    result = coord.run(**plain)
    if result.refused:
        out["12 rows of one HGG + 12 of one BM patient"] = "site refuses: " + result.refused[:90]
    else:
        truth, _ = _truth(site, result.features, plain)
        mean = result.sums["hgg"] / result.counts["n-hgg"]
        err = float(np.max(np.abs(mean - truth["h0"]) / np.maximum(np.abs(truth["h0"]), 1e-12)))
        out["12 rows of one HGG + 12 of one BM patient"] = f"class mean = the patient's features (rel. error {err:.0e})"
    return out


def ledger_cost(work: Path) -> list[list[str]]:
    """The guard's ledger check and record time as the ledger grows (sets of block unions over 400 patients)."""
    from client.ledger import Ledger

    rows = []
    rng = np.random.default_rng(0)
    patients = [f"p{i:04d}" for i in range(400)]
    labels = np.array([i % 2 for i in range(400)])
    ledger = Ledger(work / "ledger-cost" / "release", 5)
    blocking = ledger.blocking(patients, labels)
    ids = sorted(blocking.blocks)
    released = 0
    for target in (10, 50, 200):
        while released < target:
            chosen = [b for b in ids if rng.random() < 0.5] or ids[:1]
            sets = {"train": frozenset(c for b in chosen for c in blocking.blocks[b][1])}
            start = time.perf_counter()
            why = ledger.check(sets)
            check_s = time.perf_counter() - start
            assert not why, why
            start = time.perf_counter()
            ledger.record(1, "bench", sets, blocking)
            record_s = time.perf_counter() - start
            released += 1
        start = time.perf_counter()
        again = ledger.check(sets)  # a set released before: what each later round of a run costs
        repeat_s = time.perf_counter() - start
        assert not again
        rows.append([str(target), f"{check_s * 1e3:.1f}", f"{record_s * 1e3:.1f}", f"{repeat_s * 1e3:.1f}"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="an older radfed checkout to replay the same attacks against")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="radfed-release-"))
    if args.measure_only:
        print(json.dumps(measure(work)))
        return 0
    sys.path.insert(0, str(ROOT))
    from bench.table import print_columns

    after = measure(work / "after")
    before = {}
    if args.before:
        me = str(Path(__file__).resolve())
        code = (f"import sys; sys.path.insert(0, {str(args.before.resolve())!r}); __file__ = {me!r}; "
                f"sys.argv = ['x', '--measure-only', '--work', {str(work / 'before')!r}]; exec(open({me!r}).read())")
        proc = subprocess.run([sys.executable, "-c", code], cwd=args.before, capture_output=True, text=True,
                              check=True)
        before = json.loads(proc.stdout.strip().splitlines()[-1])
    print_columns("What the coordinator learns about one site's patients (24 per class)",
                  ["attack", *(["before (" + args.before.name + ")"] if args.before else []), "this code"],
                  [[k, *([before.get(k, "-")] if args.before else []), v] for k, v in after.items()])
    print_columns("Release ledger cost per reply (400 patients, blocks of 5 to 9)",
                  ["released sets", "check a new set (ms)", "record (ms)", "check a repeated set (ms)"],
                  ledger_cost(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())

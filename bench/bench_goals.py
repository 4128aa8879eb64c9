"""Issue 20's goals in one run and one table: what the federation costs beside the science.

    python bench/bench_goals.py [--work DIR] [--messages 16] [--repeats 3] [--loso 4,16,48]
                                [--pairs 4] [--scale 10,100,1000] [--skip PART,...]

One command measures every goal the issue sets, each with the bench that owns it, and prints one table of goal,
measured value and verdict, then the cost curve against the number of sites:

- ``messages``: seconds per site-message in the training rounds, radfed against Flower's floor (a trivial ClientApp
  answering the same batches with same-sized records, bench/bench_messages.py), ``--messages`` tiny sites (16),
  the default exact trainer and FedAvg (5 rounds), ``--repeats`` interleaved pairs each: the median ratio and its
  range.
- ``loso``: leave-one-site-out's folds against the main fit's wall time (bench/bench_loso.py, folds batched, exact
  training, tiny sites), at each size of ``--loso``.
- ``overhead``: the default demo's federation beside its cold extraction (bench/bench_overhead.py): the extraction
  alone (the demo's sites, 2 at a time, one worker each, in a process of its own) and the whole ``radfed demo``, both
  from the same cold caches; the federation's cost is the demo's wall minus the extraction alone; ``--pairs``
  interleaved pairs in alternating order: the median ratio and its range.
- ``scale``: the whole protocol on feature-level sites (bench/bench_scale.py) at each size of ``--scale``: wall time,
  seconds per site-message, peak memory of every process; the cost curve is the least-squares line of wall time
  against sites (a fixed start plus seconds per site).

The machine's load average is printed beside each part: on a shared machine a ratio moves with it, so a verdict
from one loaded run proves little (the per-message and overhead parts are interleaved for that reason). About 15 to
20 minutes on 2 cores with the defaults (813 s with ``--repeats 2`` at stop 34, the 1,000-site run 224 s of it);
``--skip PART`` leaves a part out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import bench_loso, bench_messages, bench_overhead, bench_scale  # noqa: E402
from bench.table import print_columns  # noqa: E402
from radfed import synth  # noqa: E402

PARTS = ("messages", "loso", "overhead", "scale")
FEDAVG_ROUNDS = 5
# the "done when", one entry per goal: (what, the bound, ``True`` when the measured value must be <= it)
GOAL_PER_MESSAGE = 1.5  # radfed's seconds per site-message in the training rounds / the floor's
GOAL_LOSO = 2.0  # leave-one-site-out's wall time / the main fit's
GOAL_OVERHEAD = 0.10  # the demo's wall minus the extraction alone / the extraction alone
GOAL_PEAK_GIB = 8.0  # peak memory of every process at 1,000 sites


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def cost_line(sites: list[int], walls: list[float]) -> tuple[float, float]:
    """Least-squares ``wall = fixed + per_site * sites`` over the measured sizes: (fixed s, s per site).

    sites, walls: shape (n,), n >= 2 distinct sizes."""
    if len(set(sites)) < 2:
        raise ValueError("the cost curve needs at least two different numbers of sites")
    mean_n, mean_w = statistics.fmean(sites), statistics.fmean(walls)
    slope = (sum((n - mean_n) * (w - mean_w) for n, w in zip(sites, walls, strict=True))
             / sum((n - mean_n) ** 2 for n in sites))
    return mean_w - slope * mean_n, slope


def verdict(value: float, bound: float) -> str:
    return "met" if value <= bound else "not met"


def messages(work: Path, n_sites: int, repeats: int) -> list[list[str]]:
    """The per-message goal, exact and FedAvg: median ratio over ``repeats`` interleaved (radfed, floor) pairs."""
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    base = {**base, "num-server-rounds": FEDAVG_ROUNDS, "external-validation": "none", "local-only": "none"}
    modes = {"exact": {**base, "training": "exact", "select-features": 3},  # tiny sites: bench_messages' docstring
             "fedavg": {**base, "training": "fedavg"}}
    dirs = bench_messages.sites(work, n_sites, 2)
    apps = {"radfed": bench_messages.make_app(work / "app-radfed", "benchapp:timed", "client.app:app"),
            "floor": bench_messages.make_app(work / "app-floor", "benchapp:floor_server", "benchapp:floor_client")}
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    loads = []
    for _ in range(repeats):
        for mode, config in modes.items():
            loads.append(_load())
            pair = bench_messages.one_pair(work, dirs, config, apps)
            ours, floor = bench_messages.per_message(pair["radfed"]), bench_messages.per_message(pair["floor"])
            ratios[mode].append(ours["per_round"] / floor["per_round"])
    rows = []
    for mode, got in ratios.items():
        median = statistics.median(got)
        what = "default, exact" if mode == "exact" else f"FedAvg, {FEDAVG_ROUNDS} rounds"
        rows.append([f"s per site-message / Flower's floor ({what}, {n_sites} sites, training rounds)",
                     f"<= {GOAL_PER_MESSAGE}", f"{median:.2f}x [{min(got):.2f}-{max(got):.2f}], {len(got)} pairs",
                     verdict(median, GOAL_PER_MESSAGE), f"{min(loads)}-{max(loads)}"])
    return rows


def loso(work: Path, sizes: list[int]) -> list[list[str]]:
    """Leave-one-site-out (batched folds) against the main fit, one run per size."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config = {**config, "training": "exact", "select-features": 3, "external-validation": "loso",
              "local-only": "none", "query-timeout": 1800.0}
    dirs = bench_messages.sites(work, max(sizes), 2)
    rows = []
    for n in sizes:
        load = _load()
        row, _, _ = bench_loso.one_run(work, dirs[:n], config, batched=True)
        main, folds = float(row[3]), float(row[4])
        rows.append([f"leave-one-site-out / main fit ({n} sites)", f"<= {GOAL_LOSO}",
                     f"{folds / main:.2f}x (main fit {main:.1f} s, folds {folds:.1f} s)",
                     verdict(folds / main, GOAL_LOSO), load])
    return rows


def overhead(work: Path, pairs: int) -> list[list[str]]:
    """The default demo's federation beside its cold extraction, ``pairs`` times interleaved: the extraction alone
    and the whole demo, each a process of its own from the same cold sites (bench_overhead.extraction_alone,
    demo_run), in alternating order (alone first in even pairs, the demo first in odd ones), since this machine's
    speed drifts by several seconds over minutes (the extraction alone took 54 to 73 s within a day, stops 40 to 42):
    each demo is set against the extraction timed beside it; the median ratio and its range, with the seconds from
    the demo's go (its last site extracted) to its end."""
    synth.make_demo(work / "demo-cold", seed=0)
    ratios, walls, alone, after, loads = [], [], [], [], []
    cases = 0
    for i in range(pairs):
        loads.append(_load())
        demo = {}
        if i % 2:
            demo = bench_overhead.demo_run(ROOT, work, f"goals-{i}")
        extraction, cases = bench_overhead.extraction_alone(ROOT, work)
        if not i % 2:
            demo = bench_overhead.demo_run(ROOT, work, f"goals-{i}")
        ratios.append((float(demo["wall"]) - extraction) / extraction)
        walls.append(float(demo["wall"]))
        alone.append(extraction)
        after.append(sum(float(demo.get(k, 0.0)) for k in ("go to run-start", "run", "run-end to exit")))
    ratio = statistics.median(ratios)
    return [[f"federation / cold extraction (default demo, {cases} cases)", f"<= {GOAL_OVERHEAD:.0%}",
             f"{ratio:.0%} [{min(ratios):.0%}-{max(ratios):.0%}], {pairs} pair(s) (demo "
             f"{'/'.join(f'{w:.0f}' for w in walls)} s, extraction alone {'/'.join(f'{a:.0f}' for a in alone)} s; "
             f"{statistics.median(after):.1f} s from the go to the end)", verdict(ratio, GOAL_OVERHEAD),
             ", ".join(loads)]]


def scale(work: Path, sizes: list[int]) -> tuple[list[list[str]], list[list[str]]]:
    """The protocol at each size: the peak-memory goal at the largest, and the cost curve's table."""
    got = [(n, _load(), bench_scale.one_size(work, n, 16, 60, 1800.0, 50)) for n in sizes]
    curve = [[str(n), row[2], row[4], row[6], row[7], row[9], load] for n, load, row in got]
    n_max, load, row = got[-1]
    done = row[-1] == "completed"
    goal = [[f"{n_max} feature-level sites complete, peak memory (every process)", f"<= {GOAL_PEAK_GIB:g} GiB",
             f"{row[7]} GiB, {row[4]} s" if done else row[-1][:120],
             verdict(float(row[7]), GOAL_PEAK_GIB) if done else "not met", load]]
    finished = [(n, float(r[4])) for n, _, r in got if r[-1] == "completed"]
    if len({n for n, _ in finished}) >= 2:
        fixed, per_site = cost_line([n for n, _ in finished], [w for _, w in finished])
        goal.append(["cost curve: wall = fixed + per site x sites (least squares)", "given and explained",
                     f"{fixed:.0f} s + {per_site:.3f} s x sites", "given", "-"])
    return goal, curve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="working folder (default: a fresh temporary one)")
    parser.add_argument("--messages", type=int, default=16, help="number of sites for the per-message part")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved (radfed, floor) pairs per training mode")
    parser.add_argument("--pairs", type=int, default=4,
                        help="interleaved (extraction alone, demo) pairs in alternating order (even: as many each way)")
    parser.add_argument("--loso", default="4,16,48", help="numbers of sites for leave-one-site-out")
    parser.add_argument("--scale", default="10,100,1000", help="numbers of feature-level sites for the cost curve")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {', '.join(PARTS)}")
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(PARTS):
        parser.error(f"--skip takes {', '.join(PARTS)}; not {', '.join(sorted(skip - set(PARTS)))}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="radfed-goals-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[list[str]] = []
    curve: list[list[str]] = []
    if "messages" not in skip:
        rows += messages(work / "tiny", args.messages, args.repeats)
    if "loso" not in skip:
        rows += loso(work / "tiny", sorted(int(s) for s in args.loso.split(",") if s))
    if "overhead" not in skip:
        rows += overhead(work / "overhead", args.pairs)
    if "scale" not in skip:
        goals, curve = scale(work / "scale", sorted(int(s) for s in args.scale.split(",") if s))
        rows += goals
    print_columns(f"Issue 20's goals, one run ({time.perf_counter() - started:.0f} s, work folder {work}; load: the "
                  "1-minute load average at each part's start)", ["goal", "bound", "measured", "verdict", "load"],
                  rows)
    if curve:
        print_columns("The cost curve (bench/bench_scale.py: a run is a fixed number of rounds of one message per "
                      "site, so its wall time is a fixed start plus a term linear in the sites)",
                      ["sites", "messages", "wall s", "s per site-message", "peak RSS GiB", "status", "load"], curve)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

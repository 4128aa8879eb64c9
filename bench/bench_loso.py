"""Leave-one-site-out at the cost of one training (issue 20): prints a table.

    python bench/bench_loso.py [--work DIR] [--sites 4,16] [--batched-only 48] [--local-only] [--profile 48]
                               [--profile-server 48] [--set loso-prefetch=false]

For each number of tiny synthetic sites (10 cases per class, extracted once before anything is timed), two
simulated radfed runs on the same data: the folds one after another (``fold-batching = false``, what every run
did before) and all folds in the same rounds (``fold-batching = true``). Both read their times from the run's
own audit log: the main fit is from ``features-agreed`` to the first ``fold-start`` (ComBat, moments, selection,
exact training, evaluation, calibration), the folds from ``fold-start`` to the last ``folds-end``; the
``folds-end`` entries count the Flower messages the folds sent (and, batched, the requests they carried and the
rounds). The issue's target: leave-one-site-out <= 2x the main fit's wall time. ``--batched-only`` sizes run
batched only (the sequential run at 48 sites takes about an hour). Each row also gives the folds' Newton rounds (mean
and slowest fold: each starts at the discriminant of its own pooled moments, common/newton_start.py), a second
table splits the folds' wall time by phase (ComBat, moments, selection, Newton, the held-out site's join and
scoring), and a third the batched folds' coordinator by step (``folds-end`` ``seconds``: the fold threads' own work,
packing, the round trips, unpacking), i.e. how much of the folds' time is the ServerApp rather than the sites, with
its CPU seconds (``seconds`` ``cpu``: the fold threads' in their turns, packing and unpacking, the whole ServerApp
process's).

``--profile-server N`` (alone: ``--sites ''``) runs one batched N-site run with the coordinator under cProfile in
every thread (bench/loso_app.py: the fold threads too) and prints the top functions by own time.

``--profile-sites N`` (alone: ``--sites ''``) runs one batched N-site run with every site's ClientApp under cProfile
inside the simulation (bench/loso_site_app.py: one profiler per Ray worker, every site it serves) and prints the sites'
CPU by message type, how many workers were busy over the folds (and the gap between one worker's messages), and the
top functions by own time.

``--profile N`` (alone: ``--sites ''``) profiles, in this process, one site answering the ``query.batch`` of a
leave-one-site-out round over N sites (N - 1 Newton requests, every mod included, bench/site_messages.py): ms per
sub-request and the top functions by own time, beside the recorded numbers before the per-batch amortisation.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
import tomllib
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_messages import data_root, sites  # noqa: E402
from bench.table import print_columns  # noqa: E402
from radfed.cli.coordinator import approve_demo_plan  # noqa: E402
from radfed.launch import run_federation  # noqa: E402

HEADER = ["sites", "folds", "mode", "main fit s", "folds s", "folds / main", "messages (folds)", "requests",
          "rounds", "Newton rounds per fold (max)", "run wall s"]
# where the folds' wall time goes, by the audit entry that ends each stretch (folds run in the same rounds, so a
# stretch ends when the slowest fold's entry is written): ComBat's two rounds, moments (each site fits its own ComBat
# location/scale), selection (correlation), the Newton rounds, the held-out site's join and scoring
PHASES = {"harmonization": "ComBat (2 rounds)", "moments": "moments", "selection": "selection",
          "newton-round": "Newton", "round-train": "Newton", "harmonization-join": "join + scoring",
          "external-validation": "join + scoring"}
PHASE_HEADER = ["sites", "mode", *dict.fromkeys(PHASES.values()), "other"]
# the batched folds' coordinator (server/folds.py, the ``folds-end`` entry's ``seconds``): the fold threads' own work
# between rounds, packing the batches, the round trips (the sites' work and Flower's delivery), unpacking
STEPS = {"folds": "folds' own work", "pack": "packing", "sites": "round trips", "unpack": "unpacking"}
# and its CPU (``folds-end`` ``seconds`` ``cpu``): the fold threads' in their turns, packing and unpacking, and the
# whole ServerApp process's over the folds (with Flower's simulation threads; the report's drawing is a child), the
# garbage collector's wall seconds over the folds and its full collections
STEP_HEADER = ["sites", *STEPS.values(), "coordinator share", "CPU: fold threads", "CPU: pack + unpack",
               "CPU: process", "garbage collector s (full)"]


def _time(entry: dict) -> datetime:
    return datetime.fromisoformat(str(entry["time"]).replace("Z", "+00:00"))


def phase_seconds(entries: list[dict], start: datetime) -> dict[str, float]:
    """The folds' wall time by phase: each gap between consecutive audit entries after ``start`` counts to the
    phase of the entry that ends it."""
    out: dict[str, float] = {}
    last = start
    for e in entries:
        t = _time(e)
        if t <= start:
            continue
        phase = PHASES.get(e["event"], "other") if e["event"] != "folds-end" else "other"
        out[phase] = out.get(phase, 0.0) + (t - last).total_seconds()
        last = t
    return out


def one_run(work: Path, dirs: list[Path], config: dict, batched: bool,
            app_dir: Path | None = None) -> tuple[list[str], list[str], list[str]]:
    """One run; its row of the table, of the phase table and (batched) of the coordinator's steps."""
    mode = "batched" if batched else "sequential"
    out = work / f"runs-{len(dirs)}-{mode}{'-profiled' if app_dir else ''}"
    shutil.rmtree(out, ignore_errors=True)
    run_config = {**config, "data-root": str(data_root(work, dirs)), "output-dir": str(out), "fold-batching": batched}
    approve_demo_plan(dirs, run_config)
    t = time.perf_counter()
    run_federation(run_config, num_supernodes=len(dirs), flwr_home=work / f"flwr-{mode}", echo=False, timeout=7200,
                   **({"app_dir": app_dir} if app_dir else {}))
    wall = time.perf_counter() - t
    folder = next(out.glob("*-run*"))
    doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    if doc["status"] != "completed":
        raise SystemExit(f"radfed run {doc['status']} ({len(dirs)} sites, {mode}): {doc['error']}")
    entries = [json.loads(line) for line in (folder / "audit.jsonl").read_text(encoding="utf-8").splitlines()]
    agreed = next(_time(e) for e in entries if e["event"] == "features-agreed")
    starts = [_time(e) for e in entries if e["event"] == "fold-start"]
    ends = [e for e in entries if e["event"] == "folds-end"]
    main = (starts[0] - agreed).total_seconds()
    folds = (_time(ends[-1]) - starts[0]).total_seconds()
    messages = sum(int(e["data"]["messages"]) for e in ends)
    requests = sum(int(e["data"].get("requests", e["data"]["messages"])) for e in ends)
    rounds = sum(int(e["data"]["rounds"]) for e in ends) if batched else "-"
    newton: dict[str, int] = {}
    for e in entries:
        if e["event"] == "newton-round" and e["data"].get("fold"):
            newton[e["data"]["fold"]] = newton.get(e["data"]["fold"], 0) + 1
    per_fold = f"{sum(newton.values()) / max(len(newton), 1):.1f} ({max(newton.values(), default=0)})"
    row = [str(len(dirs)), str(sum(int(e["data"]["folds"]) for e in ends)), mode, f"{main:.1f}", f"{folds:.1f}",
           f"{folds / main:.2f}", str(messages), str(requests), str(rounds), per_fold, f"{wall:.0f}"]
    until_end = [e for e in entries if _time(e) <= _time(ends[-1])]
    spent = phase_seconds(until_end, starts[0])
    steps = {k: sum(float(e["data"].get("seconds", {}).get(k, 0.0)) for e in ends) for k in STEPS}
    own = steps["folds"] + steps["pack"] + steps["unpack"]
    cpu = {k: sum(float(e["data"].get("seconds", {}).get("cpu", {}).get(k, 0.0)) for e in ends)
           for k in ("folds", "pack", "unpack", "process", "gc", "gc-full")}
    return row, [str(len(dirs)), mode, *(f"{spent.get(p, 0.0):.1f}" for p in PHASE_HEADER[2:])], \
        [str(len(dirs)), *(f"{v:.1f}" for v in steps.values()), f"{own / max(folds, 1e-9):.0%}",
         f"{cpu['folds']:.2f}", f"{cpu['pack'] + cpu['unpack']:.2f}", f"{cpu['process']:.1f}",
         f"{cpu['gc']:.1f} ({cpu['gc-full']:.0f})"]


# --profile 48 on the code before the per-batch amortisation (bd6fa03^: every sub-request stamped the site's files,
# re-parsed the run config, the plan hash and its fold's ComBat parameters, and wrote the ledger) and after it, two
# pairs back to back on the shared 2-core machine (load average ~14): medians of 5 batches, wall and process CPU
PROFILE_BEFORE = [["before (recorded)", "23.6-32.2", "7.7-9.7", "ComBat parameters' JSON decode, ledger write "
                   "(os.replace), 51,700 os.stat (file stamps), run-config validation, plan JSON hash"],
                  ["after (recorded)", "8.4-11.8", "2.5-2.8", "Flower's Array decoding (np.load header parse), the "
                   "handler's maths, ComBat apply, feature columns"]]


def profile(work: Path, n_sites: int) -> None:
    """One site's answer to a leave-one-site-out batch over ``n_sites`` sites, profiled in this process."""
    from flwr.supercore.task_identity import TaskIdentity

    from bench.site_messages import profile_batches
    from radfed import synth
    from radfed.cli.coordinator import extract_one_site

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # Flower's Message needs them
    [site] = synth.make_demo(work / "profile-site", synth.tiny_sites(1, 10), seed=0)
    extract_one_site(str(site), "default", 1)
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    ms, top = profile_batches(site, config, n_sites)  # wall
    print(f"\ncProfile, one site answering a {n_sites}-site leave-one-site-out batch ({n_sites - 1} Newton "
          f"sub-requests), top functions by own time:\n{top}")
    print_columns(f"Site CPU per sub-request of a {n_sites}-site batch (in process, one tiny site)",
                  ["code", "wall ms per sub-request", "CPU ms", "where the time goes"],
                  [*PROFILE_BEFORE, ["this run", f"{ms:.1f}", "-", "(above)"]])


def _app_with(folder: Path, source: str, module: str, server_ref: str, client_ref: str) -> Path:
    """A scratch copy of radfed's app whose ServerApp and ClientApp are ``server_ref`` and ``client_ref``, with
    bench/``source`` bundled beside the code as ``module``.py (bench.bench_messages.make_app)."""
    from bench.bench_messages import make_app

    app = make_app(folder, server_ref, client_ref)
    shutil.copy(ROOT / "bench" / source, app / f"{module}.py")
    text = (app / "pyproject.toml").read_text(encoding="utf-8")
    (app / "pyproject.toml").write_text(text.replace('fab-include = [', f'fab-include = ["{module}.py", ', 1),
                                        encoding="utf-8")
    return app


def profile_server(work: Path, dirs: list[Path], config: dict) -> None:
    """One batched run with the coordinator under cProfile in every thread (bench/loso_app.py): the top functions
    by own time of the ServerApp's thread and of the others (fold threads, Flower's)."""
    import pstats

    app = _app_with(work / "app-loso-profiled", "loso_app.py", "losoapp", "losoapp:profiled", "client.app:app")
    row, _, steps = one_run(work, dirs, config, True, app)
    print(" | ".join(row), flush=True)
    folder = next((work / f"runs-{len(dirs)}-batched-profiled").glob("*-run*")).parent
    # a file the launcher's stop cut short is left out (it stops the run's processes once the run logs its end)
    threads = [p for p in sorted(folder.glob("server-thread-*.prof")) if p.stat().st_size]
    main = [p for p in [folder / "server-main.prof"] if p.exists() and p.stat().st_size]
    for names, title in ((main, "the ServerApp's thread"),
                         (threads, "every other thread (the fold threads, Flower's)")):
        if not names:
            print(f"\nno profile of {title} was written")
            continue
        text_out = io.StringIO()
        stats = pstats.Stats(*map(str, names), stream=text_out)
        stats.sort_stats("tottime").print_stats(25)
        print(f"\ncProfile of the coordinator, {len(dirs)} sites, whole run, {title}; top functions by own time:")
        print("\n".join(line for line in text_out.getvalue().splitlines() if line.strip()
                        and not line.startswith(("   Ordered", "   List"))))
    print_columns("The folds' coordinator under the profiler (s)", STEP_HEADER, [steps])


def occupancy(timelines: list[list[list]], start: float, end: float,
              within: float = 0.1) -> tuple[list[float], float, int]:
    """From each worker's (start, end, type) calls (epoch s): the seconds between ``start`` and ``end`` with 0, 1, ...
    workers inside the ClientApp, and the mean gap between one worker's consecutive calls shorter than ``within``
    (inside one round) with their number."""
    edges = sorted([(max(a, start), 1) for tl in timelines for a, b, _ in tl if b > start and a < end]
                   + [(min(b, end), -1) for tl in timelines for a, b, _ in tl if b > start and a < end])
    busy = [0.0] * (len(timelines) + 1)
    level, at = 0, start
    for t, step in edges:
        busy[level] += t - at
        level, at = level + step, t
    busy[level] += end - at
    gaps = [b[0] - a[1] for tl in timelines for a, b in zip(tl, tl[1:], strict=False)
            if start <= a[1] <= end and 0 <= b[0] - a[1] < within]
    return busy, (sum(gaps) / len(gaps) if gaps else 0.0), len(gaps)


def profile_sites(work: Path, dirs: list[Path], config: dict) -> None:
    """One batched run with every site's ClientApp under cProfile (bench/loso_site_app.py): the sites' CPU inside the
    ClientApp by message type and the top functions by own time, over every worker."""
    import glob
    import pstats

    app = _app_with(work / "app-loso-sites", "loso_site_app.py", "lososites", "server.app:app",
                    "lososites:profiled_site")
    row, _, _ = one_run(work, dirs, config, True, app)
    print(" | ".join(row), flush=True)
    folder = work / f"runs-{len(dirs)}-batched-profiled"
    spent: dict[str, list[float]] = {}
    cpu = 0.0
    for path in glob.glob(str(folder / "site-*.json")):
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        cpu += float(doc["cpu"])
        for kind, values in doc["spent"].items():
            spent[kind] = [a + b for a, b in zip(spent.get(kind, [0, 0.0, 0.0]), values, strict=True)]
    print_columns(f"The sites inside the ClientApp, {len(dirs)} sites, under the profiler (every worker's process: "
                  f"{cpu:.1f} s of CPU in all)", ["message type", "calls", "wall s", "CPU s"],
                  [[k, str(int(v[0])), f"{v[1]:.1f}", f"{v[2]:.1f}"] for k, v in sorted(spent.items(),
                                                                                   key=lambda kv: -kv[1][2])])
    timelines = [json.loads(Path(p).read_text(encoding="utf-8")).get("timeline", [])
                 for p in glob.glob(str(folder / "site-*.json"))]
    entries = [json.loads(line) for p in glob.glob(str(folder / "*" / "audit.jsonl"))
               for line in Path(p).read_text(encoding="utf-8").splitlines()]
    starts = [_time(e).timestamp() for e in entries if e.get("event") == "fold-start"]
    ends = [_time(e).timestamp() for e in entries if e.get("event") == "folds-end"]
    if starts and ends:
        busy, gap, gaps = occupancy(timelines, starts[0], ends[-1])
        print_columns(f"The sites' workers over the folds ({ends[-1] - starts[0]:.1f} s): seconds with this many "
                      "workers inside radfed's ClientApp, and the mean gap between one worker's messages within a "
                      "round (Flower's and Ray's delivery: the worker waits)",
                      ["workers busy", *map(str, range(len(busy))), "gap ms (gaps)"],
                      [["seconds", *(f"{b:.1f}" for b in busy), f"{1000 * gap:.1f} ({gaps})"]])
    text_out = io.StringIO()
    pstats.Stats(*glob.glob(str(folder / "site-*.prof")), stream=text_out).sort_stats("tottime").print_stats(25)
    print(f"\ncProfile of the sites' ClientApp, {len(dirs)} sites, whole run; top functions by own time:")
    print("\n".join(line for line in text_out.getvalue().splitlines() if line.strip()
                    and not line.startswith(("   Ordered", "   List"))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default=None, help="working folder (default: a fresh temporary one)")
    parser.add_argument("--sites", default="4,16", help="comma-separated numbers of sites: both modes")
    parser.add_argument("--batched-only", default="", help="comma-separated numbers of sites: batched only")
    parser.add_argument("--local-only", action="store_true", help="the local-only baselines too (2 folds a site)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config value (TOML), e.g. loso-prefetch=false; repeatable")
    parser.add_argument("--profile", type=int, default=0, help="profile one site answering an N-site batch")
    parser.add_argument("--profile-server", type=int, default=0,
                        help="one batched run over N sites with the coordinator under cProfile (every thread)")
    parser.add_argument("--profile-sites", type=int, default=0,
                        help="one batched run over N sites with every site's ClientApp under cProfile")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="radfed-bench-loso-"))
    work.mkdir(parents=True, exist_ok=True)
    both = sorted(int(s) for s in args.sites.split(",") if s)
    batched_only = sorted(int(s) for s in args.batched_only.split(",") if s)
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config = {**config, "training": "exact", "select-features": 3, "external-validation": "loso",
              "local-only": "own-pipeline" if args.local_only else "none", "query-timeout": 1800.0,
              **tomllib.loads("\n".join(args.set))}
    if args.profile:
        profile(work, args.profile)
    if args.profile_server:
        profile_server(work, sites(work, args.profile_server, args.workers), config)
    if args.profile_sites:
        profile_sites(work, sites(work, args.profile_sites, args.workers), config)
    if not both + batched_only:
        return 0
    dirs = sites(work, max(both + batched_only), args.workers)
    rows, phases, steps = [], [], []
    for n in sorted(set(both + batched_only)):
        for batched in ((False, True) if n in both else (True,)):
            row, spent, step = one_run(work, dirs[:n], config, batched)
            rows.append(row)
            phases.append(spent)
            if batched:
                steps.append(step)
            print(" | ".join(row), flush=True)
    print_columns("Leave-one-site-out" + (" and local-only baselines" if args.local_only else "") +
                  ": folds one after another (sequential) vs all in the same rounds (batched); exact training, "
                  "tiny sites of 10 cases per class, times from each run's audit log", HEADER, rows)
    print_columns("Where the folds' wall time goes (s), by the audit entry that ends each stretch", PHASE_HEADER,
                  phases)
    if steps:
        print_columns("The batched folds' coordinator (s): the fold threads' own work between rounds, packing, the "
                      "round trips (sites and Flower's delivery), unpacking; its share of the folds' wall time",
                      STEP_HEADER, steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

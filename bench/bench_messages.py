"""Per-message cost of a site against Flower's own floor: prints tables.

    python bench/bench_messages.py [--work DIR] [--sites 4,16] [--rounds 5] [--training fedavg,exact] [--repeats 3]
                                   [--profile-messages 20] [--profile-simulation] [--floor-state-kb 80]
                                   [--context-sizes]

For each training mode and number of tiny synthetic sites (10 cases per class, extracted once before anything is
timed), one simulated radfed run (leave-one-site-out and local-only off) with its Grid wrapped to time every
send-and-receive, then the floor: the same batches of the same message types with same-sized records on the
same number of nodes, answered at once by a trivial ClientApp (bench/message_app.py). Seconds per
site-message = a batch's wall time / its messages, summed over the run; "rounds" are the training rounds' batches:
``train`` and ``evaluate`` for FedAvg (``--rounds`` of them), ``query.newton`` and ``evaluate`` for the default
exact trainer (as many Newton rounds as it takes to converge; ``select-features = 3``, since a tiny site's 14
training cases allow at most 6 coefficients at ``exact-min-cases-per-coefficient = 2``). ``--repeats N`` (default 3)
runs N rounds of such pairs, every mode and size in each (radfed then its floor, back to back: on a shared machine
the load drifts between runs, so one pair proves little), and prints every pair with the load, the median ratio
with its spread, and where a training-round batch's time goes on each side (both sides note each message's entry
and exit in their ClientApp, one appended line each; the coordinator's pulls per batch and the pull that got the
last reply: its schedule's steps; a round's period in the simulation's 0.1 s passes, the coordinator's time between
round batches, radfed's ClientApp CPU per message) and keeps every pair's batches and notes in
``<work>/pairs-<time>.json``. Then cProfile of one site's ClientApp in this process over a run of ``train``
messages: every message reloading the site (the cache cleared before each, as every message did before the run
cache) and with the run cache. ``--profile-simulation``: one more FedAvg run on the most sites with the coordinator
and every simulation worker's ClientApp under cProfile.
``--floor-state-kb N``: the floor once more with N KB of names in each node's ``context.state`` (Flower's simulation
ships a node's whole Context to the Ray actor and back with every message; a site's was ~80 KB before its lists
and ComBat parameters moved to client.nodestate). ``--context-sizes``: one more radfed run per mode on the most
sites, noting per message type the Context shipped and the handler's time inside the worker, and the floor again,
timing where a training-round batch's time goes on both sides.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.table import print_columns  # noqa: E402
from radfed import synth  # noqa: E402
from radfed.cli.coordinator import approve_demo_plan, extract_sites  # noqa: E402
from radfed.launch import run_federation  # noqa: E402

ROUND_TYPES = ("train", "evaluate", "query.newton")
HEADER = ["training", "sites", "messages", "radfed s/msg", "floor s/msg", "ratio", "radfed s/msg (rounds)",
          "floor s/msg (rounds)", "ratio (rounds)", "radfed wall s", "floor wall s"]
# This bench on the code before the run cache (commit f5bce54: every message reloaded its site, rewrote the
# feature table, recomputed the plan; torch.optim imported torch._dynamo in every worker), run back to back with
# the code after it on the same busy 2-core machine, --sites 4,16 --rounds 5; printed beside every new run.
BEFORE = [["fedavg", "4", "92", "0.4128", "0.3806", "1.08", "0.2494", "0.0485", "5.14", "61", "64"],
          ["fedavg", "16", "352", "0.2483", "0.1012", "2.45", "0.1947", "0.0089", "21.99", "122", "61"]]


def make_app(folder: Path, server: str, client: str) -> Path:
    """A scratch Flower app: radfed's code (so the plan hash is radfed's), the bench apps, and radfed's
    pyproject with the components swapped."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for part in ("common", "client", "server"):
        shutil.copytree(ROOT / part, folder / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "bench" / "message_app.py", folder / "benchapp.py")
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    text = text.replace('serverapp = "server.app:app"', f'serverapp = "{server}"')
    text = text.replace('clientapp = "client.app:app"', f'clientapp = "{client}"')
    # the app bundle holds only what fab-include lists: the bench apps' module too
    text = text.replace('fab-include = [', 'fab-include = ["benchapp.py", ', 1)
    (folder / "pyproject.toml").write_text(text, encoding="utf-8")
    return folder


def sites(work: Path, n_max: int, workers: int) -> list[Path]:
    """``n_max`` tiny sites under work/sites, extracted (cached on later runs)."""
    dirs = synth.make_demo(work / "sites", synth.tiny_sites(n_max, 10), seed=0)
    extract_sites(dirs, "default", workers)
    return dirs


def data_root(work: Path, dirs: list[Path]) -> Path:
    """A data-root holding exactly these sites (links, so every run shares one extraction)."""
    root = work / f"root-{len(dirs)}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    for d in dirs:
        (root / d.name).symlink_to(d.resolve())
    return root


def per_message(batches: list[dict], seconds_key: str = "seconds", count: str = "n") -> dict[str, float]:
    """Seconds per site-message over every batch and over the training rounds' batches, and message counts."""
    def n(b: dict) -> int:
        return len(b["messages"]) if "messages" in b else int(b[count])

    every = [b for b in batches if n(b)]
    rounds = [b for b in every if b["type"] in ROUND_TYPES]
    total = sum(n(b) for b in every)
    in_rounds = sum(n(b) for b in rounds)
    return {"messages": total, "per": sum(b[seconds_key] for b in every) / max(total, 1),
            "round_messages": in_rounds, "per_round": sum(b[seconds_key] for b in rounds) / max(in_rounds, 1)}


def _run(run_config: dict, n: int, flwr_home: Path, app: Path) -> tuple[float, str]:
    """One federation: (wall seconds, the load average before and after it)."""
    before, t = os.getloadavg()[0], time.perf_counter()
    run_federation(run_config, num_supernodes=n, flwr_home=flwr_home, app_dir=app, echo=False)
    return time.perf_counter() - t, f"{before:.1f}-{os.getloadavg()[0]:.1f}"


def one_pair(work: Path, dirs: list[Path], config: dict, apps: dict[str, Path], timeline_notes: bool = False) -> dict:
    """One radfed run, then the floor replaying it: both sides' batches, wall times and loads (with
    ``timeline_notes``, each side's per-message notes too, for ``timeline``)."""
    out = work / f"runs-{config['training']}-{len(dirs)}"
    shutil.rmtree(out, ignore_errors=True)
    run_config = {**config, "data-root": str(data_root(work, dirs)), "output-dir": str(out)}
    approve_demo_plan(dirs, run_config)
    radfed_wall, radfed_load = _run(run_config, len(dirs), work / "flwr-radfed", apps["radfed"])
    record = json.loads((out / "messages.json").read_text())
    metrics = json.loads(next(out.glob("*-run*/metrics.json")).read_text())
    if metrics["status"] != "completed":
        raise SystemExit(f"radfed run {metrics['status']}: {metrics['error']}")
    notes = _noted(out)
    for path in out.glob("sizes-*.jsonl"):  # radfed's notes apart from the floor's
        path.unlink()
    if timeline_notes:
        (out / "messages.json").write_text(json.dumps({**record, "floor-timeline": True}))
    floor_wall, floor_load = _run(run_config, len(dirs), work / "flwr-floor", apps["floor"])
    floor = json.loads((out / "floor.json").read_text())
    return {"training": str(config["training"]), "sites": len(dirs), "radfed": record["batches"],
            "floor": floor["batches"], "radfed-notes": notes, "floor-notes": _noted(out), "radfed-wall": radfed_wall,
            "floor-wall": floor_wall, "radfed-load": radfed_load, "floor-load": floor_load, "out": out}


def pair_row(pair: dict, repeat: int | None = None) -> list[str]:
    ours, base = per_message(pair["radfed"]), per_message(pair["floor"])
    return [pair["training"], str(pair["sites"]), *([] if repeat is None else [str(repeat)]), str(ours["messages"]),
            f"{ours['per']:.4f}", f"{base['per']:.4f}", f"{ours['per'] / base['per']:.2f}", f"{ours['per_round']:.4f}",
            f"{base['per_round']:.4f}", f"{ours['per_round'] / base['per_round']:.2f}", f"{pair['radfed-wall']:.0f}",
            f"{pair['floor-wall']:.0f}", *([] if repeat is None else [pair["radfed-load"], pair["floor-load"]])]


def one_size(work: Path, dirs: list[Path], config: dict, apps: dict[str, Path], floor_state: int = 0) -> list[str]:
    pair = one_pair(work, dirs, config, apps)
    row = pair_row(pair)
    if floor_state:  # the same floor, each node keeping floor_state bytes in its context.state
        out = pair["out"]
        record = json.loads((out / "messages.json").read_text())
        (out / "messages.json").write_text(json.dumps({**record, "floor-state-bytes": floor_state}))
        run_federation({**config, "data-root": str(data_root(work, dirs)), "output-dir": str(out)},
                       num_supernodes=len(dirs), flwr_home=work / "flwr-floor", app_dir=apps["floor"], echo=False)
        base = per_message(pair["floor"])
        padded = per_message(json.loads((out / "floor.json").read_text())["batches"])
        row += [f"{padded['per_round']:.4f}", f"{padded['per_round'] / base['per_round']:.2f}"]
    return row


def _spread(values: list[float], digits: int = 2) -> str:
    """``median [min-max]``."""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def ending_pulls(batches: list[dict]) -> str:
    """How many training-round batches ended at each of the coordinator's pulls (1 = the pull right after the
    push): the pull schedule's steps, e.g. ``5:3 6:12`` (pulls at ~81 and ~132 ms with the 10 ms x1.5 schedule)."""
    counts: dict[int, int] = {}
    for b in batches:
        if b["type"] in ROUND_TYPES and b.get("pulls"):
            counts[len(b["pulls"])] = counts.get(len(b["pulls"]), 0) + 1
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def repeated(work: Path, dirs: list[Path], modes: dict[str, dict], sizes: list[int], repeats: int,
             apps: dict[str, Path]) -> None:
    """``repeats`` rounds of (radfed, floor) pairs, every mode and size in each round (the load drifts: interleaved,
    each pair back to back), then the median ratio and its spread, and where a training-round batch's time goes."""
    pairs = [one_pair(work, dirs[:n], config, apps, timeline_notes=True)
             for _ in range(repeats) for config in modes.values() for n in sizes]
    kept = work / f"pairs-{time.strftime('%Y%m%dT%H%M%S')}.json"  # every pair's batches and notes, for a later look
    kept.write_text(json.dumps([{k: v for k, v in p.items() if k != "out"} for p in pairs]), encoding="utf-8")
    print(f"every pair's batches and per-message notes: {kept}")
    print_columns("Every pair, in the order run (radfed, then the floor replaying its batches; load: the 1-minute "
                  "load average before and after each run)",
                  HEADER[:2] + ["repeat"] + HEADER[2:] + ["radfed load", "floor load"],
                  [pair_row(p, 1 + i // (len(modes) * len(sizes))) for i, p in enumerate(pairs)])
    summary, where = [], []
    for mode in modes:
        for n in sizes:
            group = [p for p in pairs if p["training"] == mode and p["sites"] == n]
            ours = [per_message(p["radfed"]) for p in group]
            base = [per_message(p["floor"]) for p in group]
            summary.append([mode, str(n), str(len(group)),
                            _spread([o["per_round"] / b["per_round"] for o, b in zip(ours, base, strict=True)]),
                            _spread([o["per"] / b["per"] for o, b in zip(ours, base, strict=True)]),
                            _spread([o["per_round"] for o in ours], 4), _spread([b["per_round"] for b in base], 4)])
            for side in ("radfed", "floor"):
                parts = [timeline(p[side], p[f"{side}-notes"]) for p in group]
                rounds = [b for p in group for b in p[side] if b["type"] in ROUND_TYPES]
                paced = [cadence(p[side], p[f"{side}-notes"]) for p in group]
                where.append([mode, str(n), side, *(f"{statistics.median(v[i] for v in parts):.0f}" for i in range(5)),
                              f"{statistics.median(len(b['pulls']) for b in rounds):.0f}",
                              f"{1000 * statistics.median(b['pulling'] for b in rounds):.1f}", ending_pulls(rounds),
                              *(f"{statistics.median(v[i] for v in paced):.{d}f}"
                                for i, d in ((0, 0), (1, 0), (2, 2)))])
    print_columns(f"Median over {repeats} interleaved pair(s) [min-max]: ratio radfed / floor, s per site-message",
                  ["training", "sites", "pairs", "ratio (rounds)", "ratio (every message)", "radfed s/msg (rounds)",
                   "floor s/msg (rounds)"], summary)
    print_columns("Where a training-round batch's time goes (ms per batch: each pair's mean, median over the pairs; "
                  "pulls: the coordinator's pulls per batch, median; pulling: their time per batch; ending pull: "
                  "batches ending at the n-th pull after the push, n:count; then medians: a round's period from its "
                  "first message in a ClientApp to the next round's, a whole number of the simulation's ~0.1 s "
                  "passes; the coordinator's own time between round batches; radfed's ClientApp thread CPU per "
                  "round message)",
                  ["training", "sites", "app", "push -> first in ClientApp", "first in -> last out",
                   "in ClientApps (sum)", "last out -> pulled", "batch wall", "pulls", "pulling ms", "ending pull",
                   "first in -> next round's", "coordinator: pulled -> next push", "ClientApp CPU per message"],
                  where)


def _noted(out: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(out.glob("sizes-*.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines()]


def timeline(batches: list[dict], noted: list[dict]) -> list[float]:
    """Mean milliseconds per training-round batch: from the push to the first message entering a ClientApp (Flower's
    pick-up: the simulation polls its queue every 0.1 s, then Ray), from there to the last one leaving it, the
    ClientApp's own time summed over the batch's messages, and from the last one leaving to the coordinator pulling
    the last reply; the batch's wall time. Messages are matched to their batch by time (batches do not overlap)."""
    parts = []
    for b in batches:
        if b["type"] not in ROUND_TYPES:
            continue
        inside = [e for e in noted if b["pushed"] <= e["in"] <= b["pushed"] + b["seconds"]]
        if inside:
            first, last = min(e["in"] for e in inside), max(e["out"] for e in inside)
            parts.append([first - b["pushed"], last - first, sum(e["out"] - e["in"] for e in inside),
                          b["pushed"] + b["seconds"] - last, b["seconds"]])
    return [1000 * sum(p[i] for p in parts) / max(len(parts), 1) for i in range(5)]


def cadence(batches: list[dict], noted: list[dict]) -> list[float]:
    """Median milliseconds: from a training-round batch's first message entering a ClientApp to the next round
    batch's (Flower's simulation queues a node's messages in passes every ~0.1 s, so a round takes a whole number of
    passes: ~103 or ~206 ms), the coordinator's own time from a round batch's last reply pulled to its next push, and
    the ClientApp's thread CPU per message (radfed's notes; nan without them)."""
    rounds = [b for b in batches if b["type"] in ROUND_TYPES and (b.get("messages") or b.get("n"))]
    firsts = [min((e["in"] for e in noted if b["pushed"] <= e["in"] <= b["pushed"] + b["seconds"]), default=None)
              for b in rounds]
    periods = [b - a for a, b in zip(firsts, firsts[1:], strict=False) if a is not None and b is not None]
    ordered = [b for b in batches if b.get("messages") or b.get("n")]
    between = [b["pushed"] - (a["pushed"] + a["seconds"]) for a, b in zip(ordered, ordered[1:], strict=False)
               if a["type"] in ROUND_TYPES and b["type"] in ROUND_TYPES]
    cpu = [e["cpu"] for e in noted if "cpu" in e and e["type"] in ROUND_TYPES]

    def median(values: list[float]) -> float:
        return 1000 * statistics.median(values) if values else float("nan")

    return [median(periods), median(between), median(cpu)]


def context_sizes(work: Path, dirs: list[Path], config: dict,
                  floor_app: Path) -> tuple[list[list[str]], list[list[str]]]:
    """One radfed run with ``benchapp:sized_client``: per message type, the mean pickled Context Flower shipped to the
    worker and back, and the median seconds of radfed's ClientApp (mods included) inside the worker; then the
    floor replaying it, and where a training-round batch's time goes on each side (``timeline``)."""
    app = make_app(work / "app-sized", "benchapp:timed", "benchapp:sized_client")
    out = work / f"runs-sized-{config['training']}-{len(dirs)}"
    shutil.rmtree(out, ignore_errors=True)
    run_config = {**config, "data-root": str(data_root(work, dirs)), "output-dir": str(out)}
    approve_demo_plan(dirs, run_config)
    run_federation(run_config, num_supernodes=len(dirs), flwr_home=work / "flwr-sized", app_dir=app, echo=False)
    noted = _noted(out)
    seen: dict[str, list[dict]] = {}
    for entry in noted:
        seen.setdefault(entry["type"], []).append(entry)
    sizes = [[str(config["training"]), kind, str(len(v)),
              f"{sum(e['context-in'] + e['context-out'] for e in v) / 2 / len(v) / 1000:.1f}",
              f"{1000 * sorted(e['seconds'] for e in v)[len(v) // 2]:.1f}"] for kind, v in seen.items()]
    record = json.loads((out / "messages.json").read_text())
    kept = out / "radfed-notes"  # radfed's notes kept apart from the floor's
    kept.mkdir(exist_ok=True)
    for path in out.glob("sizes-*.jsonl"):
        path.rename(kept / path.name)
    (out / "messages.json").write_text(json.dumps({**record, "floor-timeline": True}))
    run_federation(run_config, num_supernodes=len(dirs), flwr_home=work / "flwr-floor", app_dir=floor_app, echo=False)
    floor = json.loads((out / "floor.json").read_text())["batches"]
    lines = [[str(config["training"]), who, *(f"{v:.0f}" for v in timeline(batches, notes))]
             for who, batches, notes in (("radfed", record["batches"], noted), ("floor", floor, _noted(out)))]
    return sizes, lines


def profile_simulation(work: Path, dirs: list[Path], config: dict) -> None:
    """One radfed run with the coordinator and the ClientApp of every simulation worker under cProfile: the top
    functions of each side, and the seconds the site's handlers took per message."""
    app = make_app(work / "app-profiled", "benchapp:profiled_server", "benchapp:profiled_client")
    out = work / "runs-profiled"
    shutil.rmtree(out, ignore_errors=True)
    run_config = {**config, "data-root": str(data_root(work, dirs)), "output-dir": str(out)}
    approve_demo_plan(dirs, run_config)
    run_federation(run_config, num_supernodes=len(dirs), flwr_home=work / "flwr-profiled", app_dir=app, echo=False)
    files = sorted(out.glob("client-*.prof"))
    stats = pstats.Stats(*map(str, files))
    calls = sum(n for (path, _, name), (_, n, *_) in stats.stats.items() if name == "__call__"  # type: ignore[attr-defined]
                and path.endswith("client_app.py"))
    total = sum(t for (path, _, name), (_, _, _, t, _) in stats.stats.items()  # type: ignore[attr-defined]
                if name == "__call__" and path.endswith("client/batch.py"))
    print(f"\ncProfile of radfed's ClientApp inside the simulation ({len(dirs)} sites, {len(files)} worker "
          f"process(es), {calls} message(s), {1000 * total / max(calls, 1):.1f} ms per message under the profiler); "
          f"top functions by cumulative time:\n" + _top(stats, r"(client|common|flwr)/.*\.py", 24))
    server = pstats.Stats(str(out / "server.prof"))
    print(f"\ncProfile of radfed's coordinator (the ServerApp process, {len(dirs)} sites); top functions by "
          "cumulative time:\n" + _top(server, r"(server|common|flwr|benchapp)[^/]*/?.*\.py", 30))


def _top(stats: pstats.Stats, pattern: str, n: int) -> str:
    text = io.StringIO()
    stats.stream = text  # type: ignore[attr-defined]
    stats.sort_stats("cumulative").print_stats(pattern, n)
    return "\n".join(line for line in text.getvalue().splitlines()
                     if "ncalls" in line or ("/" in line and "List" not in line))


def profile_site(site_dir: Path, config: dict, n_messages: int, reload_each: bool) -> tuple[float, str]:
    """cProfile of ``n_messages`` train messages through radfed's ClientApp (mods included) at one site:
    (median seconds per message without the profiler, the top functions by cumulative time with it)."""
    from bench.site_messages import SiteHarness

    harness = SiteHarness(site_dir, config)
    harness.train()  # the first message of a run loads the site either way
    timed = []
    for _ in range(n_messages):  # without the profiler: the median (the machine's other load spreads the mean)
        if reload_each:
            harness.forget()
        t = time.perf_counter()
        harness.train()
        timed.append(time.perf_counter() - t)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(n_messages):
        if reload_each:
            harness.forget()
        harness.train()
    profiler.disable()
    seconds = sorted(timed)[len(timed) // 2]
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(r"(client|common|flwr/clientapp)/.*\.py", 14)
    lines = [line for line in out.getvalue().splitlines() if "ncalls" in line or ("/" in line and "List" not in line)]
    return seconds, "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default=None, help="working folder (default: a fresh temporary one)")
    parser.add_argument("--sites", default="4,16", help="comma-separated numbers of sites")
    parser.add_argument("--rounds", type=int, default=5, help="FedAvg rounds (train + evaluate each)")
    parser.add_argument("--training", default="fedavg,exact", help="comma-separated training modes to run")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved (radfed, floor) pairs per mode and size: median ratio and spread, and where "
                             "a batch's time goes (1: one pair each, the single table)")
    parser.add_argument("--profile-messages", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-federation", action="store_true", help="only the in-process profile")
    parser.add_argument("--profile-simulation", action="store_true",
                        help="one more FedAvg run on the most sites, the coordinator and its ClientApps profiled")
    parser.add_argument("--floor-state-kb", type=float, default=0,
                        help="also run the floor with this many KB of names in each node's context.state")
    parser.add_argument("--context-sizes", action="store_true",
                        help="one more radfed run per mode on the most sites: the Context shipped per message type")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="radfed-bench-messages-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = sorted(int(s) for s in args.sites.split(","))
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    base = {**base, "num-server-rounds": args.rounds, "external-validation": "none", "local-only": "none"}
    modes = {"fedavg": {**base, "training": "fedavg"},
             "exact": {**base, "training": "exact", "select-features": 3}}  # tiny sites: see the docstring
    dirs = sites(work, sizes[-1], args.workers)

    if not args.skip_federation and args.repeats > 1:
        apps = {"radfed": make_app(work / "app-radfed", "benchapp:timed", "benchapp:noted_client"),
                "floor": make_app(work / "app-floor", "benchapp:floor_server", "benchapp:floor_client")}
        repeated(work, dirs, {m: modes[m] for m in args.training.split(",")}, sizes, args.repeats, apps)
    elif not args.skip_federation:
        apps = {"radfed": make_app(work / "app-radfed", "benchapp:timed", "client.app:app"),
                "floor": make_app(work / "app-floor", "benchapp:floor_server", "benchapp:floor_client")}
        state = int(args.floor_state_kb * 1000)
        rows = [one_size(work, dirs[:n], modes[mode], apps, state) for mode in args.training.split(",") for n in sizes]
        header = HEADER + ([f"floor+{args.floor_state_kb:g}KB state s/msg (rounds)", "vs floor (rounds)"] if state
                           else [])
        print_columns(f"Seconds per site-message, radfed vs the trivial-ClientApp floor (FedAvg: {args.rounds} rounds; "
                      "exact: Newton rounds to convergence; tiny sites of 10 cases per class, LOSO and local-only "
                      "off; '(rounds)': the training rounds' messages only: train/evaluate, query.newton/evaluate)",
                      header, rows)
        print_columns("Before the run cache (recorded, commit f5bce54, same bench and machine)", HEADER, BEFORE)

    if args.context_sizes:
        floor_app = make_app(work / "app-floor", "benchapp:floor_server", "benchapp:floor_client")
        both = [context_sizes(work, dirs[:sizes[-1]], modes[mode], floor_app) for mode in args.training.split(",")]
        print_columns(f"Context Flower ships with each message, radfed ({sizes[-1]} sites; the trivial ClientApp's is "
                      "~1.7 KB: its run config)", ["training", "message type", "messages", "context KB (mean)",
                                                   "ClientApp ms (median)"], [r for rows, _ in both for r in rows])
        print_columns(f"Where a training-round batch's time goes ({sizes[-1]} sites; ms per batch, mean)",
                      ["training", "app", "push -> first in ClientApp", "first in -> last out", "in ClientApps (sum)",
                       "last out -> pulled", "batch wall"], [r for _, rows in both for r in rows])
    if args.profile_simulation:
        profile_simulation(work, dirs[:sizes[-1]], modes["fedavg"])
    profiled = []
    for reload_each, label in ((True, "every message reloads the site"), (False, "run cache")):
        seconds, top = profile_site(dirs[0], modes["fedavg"], args.profile_messages, reload_each)
        profiled.append([label, f"{seconds * 1000:.1f}"])
        print(f"\ncProfile, one site's ClientApp, {args.profile_messages} train messages, {label} "
              f"({seconds * 1000:.1f} ms per message); top functions by cumulative time:\n{top}")
    print_columns("Site time per train message (in process, one tiny site, median)", ["site", "ms per message"],
                  profiled)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

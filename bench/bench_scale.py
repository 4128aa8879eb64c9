"""The whole protocol at 10, 100 and 1,000 simulated hospitals in Flower's simulation: prints one table.

    python bench/bench_scale.py [--work DIR] [--sites 10,100,1000] [--per-class 16] [--features 60] [--profile]

Sites are feature-level (bench/scale_sites.py): each folder holds what extraction would have cached, so no image
is read. Each run is the default protocol with leave-one-site-out and local-only off: plan, features, distributed
ComBat (2 rounds), moments, selection (correlation), histograms, exact training (Newton rounds), evaluation and
the calibration rounds. Columns: wall time of ``flwr run`` (SuperLink start to its stop) and of the ServerApp,
messages the sites sent (every site's outbox, i.e. every reply that passed its guard), seconds per site-message
(ServerApp seconds / messages), peak resident memory summed over this process and every process under it
(SuperLink, simulation, Ray workers; psutil, sampled every 0.5 s), and the AUC of the final model.

The cost curve: a run is a fixed number of rounds (15 to 17 messages per site here, at 10 and at 1,000 sites: exact
training converges in 3 or 4 Newton steps whatever their number), each a batch of one message per site.
Flower's simulation runs the ClientApps on the node's cores (2 here), so a batch costs about sites x seconds per
site-message / cores, and wall time is a fixed start-up (SuperLink, Ray: about 9 s) plus a term linear in the sites
(measured, 2 shared cores: 10 sites 20 s, 1,000 sites 894 s at 0.052 s per site-message, peak 2.9 GiB). Three
things grew with the square of the sites and were removed: each site's ComBat matrix, the simulation node
listing data-root (every site folder) several times per message, and Flower's simulation checking every held
message for every node every 0.1 s (``send-batch`` bounds the held messages; this bench uses 50).
The server's own work per round is linear too: it sums the replies as they are read (ComBat's design has one
column per site, so each site sends only its own block of it, not the whole sites x sites matrix, and the
server adds the blocks into one matrix: the one solve of that matrix is the only step that grows faster, and at
1,000 sites it takes well under a second). Memory is then the simulation's fixed footprint (Ray and its workers)
plus the replies of one batch. A site also computed that block from its (n, sites) design's sites x sites XᵀX
(``common.combat.site_moments``: 0.76 ms per site at 100 sites, 27.5 ms at 300 under cProfile at load 13-14), which
made ComBat's rounds 12x a Newton round at 1,000 sites; it now uses only its own columns (0.93 ms at 300, load
14-23), and the sites' CPU per site over a whole run is flat from 100 to 300 sites (149 and 152 ms; 151 and 184
before). Measured at 1,000 sites after it (no profiler, load 12-23): harmonization 134 s against 30-34 s per Newton
round (4.2x; 286 s against 24 s before). Numbers and pairs: docs/performance.md ("bench_scale").

``--profile`` runs the coordinator under cProfile (written as the ServerApp announces its end) and every site's
ClientApp under one profiler per Ray worker (bench/loso_site_app.py), and prints their top functions by own time and
the sites' CPU by message type; every run prints the seconds between its audit events (a run of one event, e.g.
every site's ``site-plan``, once).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scale_sites import write_feature_sites  # noqa: E402
from bench.table import print_columns  # noqa: E402
from radfed.cli.coordinator import approve_demo_plan  # noqa: E402
from radfed.launch import run_federation  # noqa: E402

HEADER = ["sites", "cases", "messages", "rounds", "wall s", "ServerApp s", "s per site-message", "peak RSS GiB",
          "held-out AUC", "status"]


class PeakMemory:
    """Peak of the summed RSS of this process and all its descendants, sampled in a thread."""

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


# The coordinator under cProfile (bench/loso_app.py's, on the ServerApp's thread only: this run has no fold threads),
# written as the ServerApp announces its end (server.app.announce_end): the launcher stops the run's processes then,
# before the ServerApp could write it on its way out.
SERVER_APP = """
import cProfile
from pathlib import Path

import server.app as radfed_server
from flwr.serverapp import ServerApp

profiled = ServerApp()
_announce = radfed_server.announce_end


@profiled.main()
def profiled_main(grid, context):
    out = Path(str(context.run_config["output-dir"])).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    profiler = cProfile.Profile()

    def announce(status, lines):
        profiler.disable()
        profiler.dump_stats(str(out / "server-main.prof"))
        _announce(status, lines)

    radfed_server.announce_end = announce
    profiler.enable()
    radfed_server.main(grid, context)
"""


def profiled_app(work: Path) -> Path:
    """A scratch copy of radfed's app with the coordinator under cProfile (``SERVER_APP``) and every site's ClientApp
    under one profiler per Ray worker (bench/loso_site_app.py)."""
    from bench.bench_messages import make_app

    app = make_app(work / "app-scale-profiled", "scaleserver:profiled", "lososites:profiled_site")
    (app / "scaleserver.py").write_text(SERVER_APP, encoding="utf-8")
    shutil.copy(ROOT / "bench" / "loso_site_app.py", app / "lososites.py")
    text = (app / "pyproject.toml").read_text(encoding="utf-8")
    (app / "pyproject.toml").write_text(text.replace('fab-include = [', 'fab-include = ["scaleserver.py", '
                                                     '"lososites.py", ', 1), encoding="utf-8")
    return app


def print_profiles(folder: Path, n_sites: int, top: int = 30) -> None:
    """The coordinator's and the sites' top functions by own time, and the sites' CPU by message type."""
    import io
    import pstats

    spent: dict[str, list[float]] = {}
    for path in folder.glob("site-*.json"):
        for kind, values in json.loads(path.read_text(encoding="utf-8"))["spent"].items():
            spent[kind] = [a + b for a, b in zip(spent.get(kind, [0, 0.0, 0.0]), values, strict=True)]
    print_columns(f"The sites inside the ClientApp, {n_sites} sites (every worker)", ["message type", "calls",
                  "wall s", "CPU s"], [[k, str(int(v[0])), f"{v[1]:.2f}", f"{v[2]:.2f}"]
                                       for k, v in sorted(spent.items(), key=lambda kv: -kv[1][2])])
    server = [str(p) for p in [folder / "server-main.prof", *sorted(folder.glob("server-thread-*.prof"))]
              if p.exists() and p.stat().st_size]
    sites = [str(p) for p in folder.glob("site-*.prof") if p.stat().st_size]
    for names, title in ((server, "the coordinator (every thread)"), (sites, "the sites' ClientApp (every worker)")):
        if not names:
            print(f"\nno profile of {title} was written")
            continue
        out = io.StringIO()
        pstats.Stats(*names, stream=out).sort_stats("tottime").print_stats(top)
        print(f"\ncProfile of {title}, {n_sites} sites, whole run; top functions by own time:")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip()
                        and not line.startswith(("   Ordered", "   List"))))


def phase_seconds(folder: Path) -> list[tuple[str, float]]:
    """Seconds between consecutive audit entries, by the event that ends each gap, in run order (a run of entries
    of one event, e.g. every site's ``site-plan``, counts once)."""
    from datetime import datetime

    entries = [json.loads(line) for line in (folder / "audit.jsonl").read_text(encoding="utf-8").splitlines()]
    times = [datetime.fromisoformat(str(e["time"]).replace("Z", "+00:00")) for e in entries]
    out: list[tuple[str, float]] = []
    for e, a, b in zip(entries[1:], times, times[1:], strict=False):
        if out and out[-1][0] == e["event"] and e["event"] not in ("newton-round", "recalibration-round"):
            out[-1] = (e["event"], out[-1][1] + (b - a).total_seconds())
        else:
            out.append((e["event"], (b - a).total_seconds()))
    return out


def one_size(work: Path, n_sites: int, per_class: int, n_features: int, timeout: float, batch: int,
             profile: bool = False) -> list[str]:
    root = work / f"sites-{n_sites}"
    t = time.perf_counter()
    dirs = write_feature_sites(root, n_sites, per_class, n_features)
    print(f"{n_sites} site(s) written or reused in {time.perf_counter() - t:.0f} s", flush=True)
    for d in dirs:  # each run starts from empty outboxes and ledgers of earlier runs' messages
        for name in ("outbox.jsonl", "receipts.jsonl"):
            (d / ".radfed" / name).unlink(missing_ok=True)
    out = work / f"runs-{n_sites}{'-profiled' if profile else ''}"
    shutil.rmtree(out, ignore_errors=True)
    run_config = {"data-root": str(root), "output-dir": str(out), "external-validation": "none",
                  "local-only": "none", "min-sites": 2, "query-timeout": timeout, "send-batch": batch}
    approve_demo_plan(dirs, run_config)
    flwr_home = work / f"flwr-{n_sites}"
    shutil.rmtree(flwr_home, ignore_errors=True)
    flwr_home.mkdir(parents=True)
    with PeakMemory() as memory:
        t = time.perf_counter()
        run_federation(run_config, num_supernodes=n_sites, flwr_home=flwr_home, echo=False, timeout=4 * timeout,
                       **({"app_dir": profiled_app(work)} if profile else {}))
        wall = time.perf_counter() - t
    runs = sorted(out.glob("*-run*"))
    if not runs:
        log = (flwr_home / "flwr-run.log").read_text(encoding="utf-8", errors="replace")[-3000:]
        return [str(n_sites), "", "", "", f"{wall:.0f}", "", "", f"{memory.peak / 2**30:.2f}", "", "no run: " + log]
    doc = json.loads((runs[-1] / "metrics.json").read_text(encoding="utf-8"))
    messages = sum(len((d / ".radfed" / "outbox.jsonl").read_text(encoding="utf-8").splitlines())
                   for d in dirs if (d / ".radfed" / "outbox.jsonl").exists())
    print(" ".join(f"{event} {s:.1f}" for event, s in phase_seconds(runs[-1])), flush=True)
    if profile:
        print_profiles(runs[-1].parent, n_sites)
    cases = sum(int(s.get("split", {}).get("n-cases", 0)) for s in doc.get("sites", {}).values())
    auc = ((doc.get("final") or {}).get("aggregate") or {}).get("auc")
    seconds = float(doc.get("seconds") or 0.0)
    status = doc["status"] if doc["status"] == "completed" else f"{doc['status']}: {doc.get('error')}"
    return [str(n_sites), str(cases), str(messages), str(len(doc.get("rounds") or [])), f"{wall:.0f}",
            f"{seconds:.0f}", f"{seconds / max(messages, 1):.4f}", f"{memory.peak / 2**30:.2f}",
            f"{auc:.3f}" if isinstance(auc, float) else "", status]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="working folder (default: a fresh temporary one)")
    parser.add_argument("--sites", default="10,100,1000")
    parser.add_argument("--per-class", type=int, default=16, help="cases of each class per site")
    parser.add_argument("--features", type=int, default=60, help="features per case")
    parser.add_argument("--timeout", type=float, default=1800.0, help="query-timeout of each batch, seconds")
    parser.add_argument("--send-batch", type=int, default=50, help="run config send-batch (0: all sites at once)")
    parser.add_argument("--profile", action="store_true", help="coordinator and sites under cProfile (their top "
                        "functions and the sites' CPU by message type are printed after each size's run)")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="radfed-scale-"))
    rows = []
    for n in (int(s) for s in args.sites.split(",")):
        rows.append(one_size(work, n, args.per_class, args.features, args.timeout, args.send_batch,
                             args.profile))
        print_columns(f"radfed at scale: feature-level sites, {args.per_class} cases per class, {args.features} "
                      f"features, exact training, LOSO and local-only off, send-batch {args.send_batch} "
                      f"(work folder {work})", HEADER, rows)
    return 0 if all(r[-1] == "completed" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

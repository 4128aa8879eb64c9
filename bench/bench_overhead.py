"""Extraction throughput and the federation's overhead beside it, per extraction profile: prints tables.

    python bench/bench_overhead.py [--work DIR] [--profiles default,extended] [--scale 1.0] [--modes merged]
                                   [--reuse-extraction] [--timeline]
    python bench/bench_overhead.py --work DIR --demo BEFORE_ROOT,AFTER_ROOT [--pairs 3]

For each profile, on the demo's four synthetic hospitals (``--scale`` multiplies their case counts; 1 = the demo's
170 cases):

- cold extraction: every site extracted from an empty cache, two sites at a time with one worker each (2 cores,
  as ``make demo`` does); cases per second per core = usable cases / (wall seconds x 2);
- the federation as the demo runs it (default run config: main run, leave-one-site-out and the local-only
  baselines, fold-batching on) on the warm caches: wall seconds of ``flwr run`` from the launch (Ray head,
  SuperLink) to every process stopped, the ServerApp's own seconds, and where they went (from the audit log's
  times: start-up before the first entry, plan + features, the main fit, the folds, outputs); Flower messages and
  requests (run-end);
- overhead ratio = federation wall / cold extraction wall (goal, issue 20: <= 10% on the default demo).

``--demo ROOT[,ROOT]`` times instead the whole ``radfed demo`` (the ``make demo`` path) of each checkout, from cold
caches, interleaved ``--pairs`` times: since the demo starts its federation beside the last sites' extraction, the
federation's cost there is the demo's wall minus the extraction alone (the extraction a run reports is then the
time to its last site, on cores it shared with Flower's start); the run folders stay under ``WORK/demo-runs``.
``--timeline`` prints, for each federation run, its processes (first seen, gone, CPU seconds), the stream's lines
and the audit entries in seconds from the launch, then the CPU seconds by kind of process (Ray's services, Flower's,
the actors), with, for a gated demo, how many of them were spent before the go (beside the last site's extraction).

``--modes merged,separate`` runs the federation with ``merge-phases`` on and off (the messages each sends);
``--reuse-extraction`` keeps the sites' caches and the cold extraction time measured by an earlier run in ``--work``
(to time only the federation, e.g. of another version of the code). ``--extraction-only`` stops after the cold
extraction (cases per second per core alone; the whole extended demo took 887 s on the loaded 2 cores, README).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.demo_run import default_config  # noqa: E402
from bench.table import print_columns  # noqa: E402
from radfed import synth  # noqa: E402
from radfed.cli.coordinator import approve_demo_plan, extract_sites  # noqa: E402
from radfed.launch import run_federation  # noqa: E402

CORES = 2
HEADER = ["profile", "mode", "cases", "features", "cold extraction s", "cases/s/core", "federation wall s",
          "ServerApp s", "overhead ratio", "messages (per site)", "requests", "status"]
PHASES = ["profile", "mode", "start-up s", "plan + features s", "main fit + scoring s", "folds s", "outputs s",
          "shutdown s", "rounds main", "rounds folds"]


def _sites(work: Path, profile: str, scale: float, reuse: bool) -> list[Path]:
    root = work / f"demo-{profile}"
    dirs = synth.make_demo(root, sites=synth.default_sites(scale), seed=0)
    for d in dirs if not reuse else []:  # cold: no cache, no ledger or outbox of an earlier bench run
        shutil.rmtree(d / ".radfed", ignore_errors=True)
    return dirs


def cold_extraction(dirs: list[Path], profile: str) -> tuple[float, int]:
    """Wall seconds to extract every site from an empty cache, 2 sites at a time, 1 worker each; usable cases."""
    t = time.perf_counter()
    done = extract_sites(dirs, profile, CORES)
    return time.perf_counter() - t, sum(r[1] for r in done)


def _time(entry: dict) -> float:
    return datetime.fromisoformat(entry["time"]).timestamp()


def phases(folder: Path, started: float, stopped: float) -> tuple[list[str], dict]:
    """Seconds from the run's audit times: start-up (launch to the first entry), plan + features, main fit and its
    scoring (to the folds' start), folds, outputs (folds' end to run-end), shutdown (run-end to the launcher's
    processes stopped); rounds; and run-end's data."""
    entries = [json.loads(line) for line in (folder / "audit.jsonl").read_text(encoding="utf-8").splitlines()]
    at = {}
    for e in entries:
        at.setdefault(e["event"], _time(e))
    end = entries[-1]
    first, agreed = _time(entries[0]), at.get("features-agreed", _time(end))
    folds_start = at.get("fold-start", _time(end))
    folds_end = max((_time(e) for e in entries if e["event"] == "folds-end"), default=folds_start)
    rounds_main = sum(1 for e in entries if e["event"] in ("newton-round", "recalibration-round", "round-train")
                      and "fold" not in e["data"])
    rounds_folds = sum(int(e["data"].get("rounds") or 0) for e in entries if e["event"] == "folds-end")
    return ([f"{first - started:.1f}", f"{agreed - first:.1f}", f"{folds_start - agreed:.1f}",
             f"{folds_end - folds_start:.1f}", f"{_time(end) - folds_end:.1f}", f"{stopped - _time(end):.1f}",
             str(rounds_main), str(rounds_folds)],
            end["data"])


class Timeline:
    """Samples, every 20 ms while a run goes, the processes started with its FLWR_HOME (first seen, gone, CPU
    seconds) and the new lines of its ``flwr-run.log``, each stamped with the time it was first seen; ``print``
    gives them in order beside the audit log's entries, in seconds from the launch (``--timeline``)."""

    def __init__(self, flwr_home: Path) -> None:
        self.mark, self.log = f"FLWR_HOME={flwr_home}".encode(), flwr_home / "flwr-run.log"
        self.gate = flwr_home / "start-gate"  # a gated run's go (radfed demo): CPU seconds are split there
        self.procs: dict[int, list] = {}  # pid -> [first seen, last seen, command, cpu s, cpu s before the go]
        # sampled whatever their environment: the demo's own process (the launcher; since the in-process federation
        # also the simulation and the ServerApp, which set FLWR_HOME only in its memory, not in /proc's environ)
        self.pids: set[int] = set()
        self.lines: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.tick = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> Timeline:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _sample(self) -> None:
        offset, gone = 0, False
        while not self.stop.is_set():
            now = time.time()
            went = not gone and self.gate.exists()  # this sweep's CPU seconds are those at the go (20 ms late)
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                pid = int(proc.name)
                try:
                    if pid not in self.procs:
                        if pid not in self.pids and self.mark not in (proc / "environ").read_bytes().split(b"\0"):
                            continue
                        cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                        self.procs[pid] = [now, now, cmd, 0.0, 0.0 if gone else None]  # new after the go: none
                    elif now - self.procs[pid][0] < 2.0:  # a forked child shows its parent's command until it execs
                        cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                        self.procs[pid][2] = cmd or self.procs[pid][2]
                    stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                    self.procs[pid][1] = now
                    self.procs[pid][3] = (int(stat[11]) + int(stat[12])) / self.tick
                except OSError:
                    continue
            if went:
                gone = True
                for record in self.procs.values():
                    record[4] = record[3]  # a process gone before the go: all of its seconds
            if self.log.exists():
                with self.log.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                cut = chunk.rfind(b"\n") + 1
                offset += cut
                self.lines += [(now, line) for line in chunk[:cut].decode(errors="replace").splitlines() if line]
            time.sleep(0.02)

    def print(self, started: float, folder: Path | None, marks: list[tuple[float, str]] | None = None) -> None:
        events = list(marks or [])
        events += [(t, f"process {pid} {'' if i == 0 else 'gone'} {cmd[:110]}" + (f" cpu {cpu:.1f}s" if i else "")
                    + (f" ({ahead:.1f}s before the go)" if i and ahead is not None else ""))
                   for pid, (first, last, cmd, cpu, ahead) in self.procs.items() for i, t in enumerate((first, last))]
        events += [(t, f"log {line[:130]}") for t, line in self.lines]
        if folder is not None and (folder / "audit.jsonl").exists():
            for line in (folder / "audit.jsonl").read_text(encoding="utf-8").splitlines():
                entry = json.loads(line)
                events.append((_time(entry), f"audit {entry['event']}"))
        for t, what in sorted(events):
            print(f"{t - started:7.2f}  {what}")
        kinds: dict[str, list[float]] = {}
        for _, _, cmd, cpu, ahead in self.procs.values():
            kind = next((name for name, part in PROCESS_KINDS if part in cmd), "other")
            total = kinds.setdefault(kind, [0.0, 0.0, 0.0])
            total[0] += cpu
            total[1] += cpu if ahead is None else ahead  # no go (an ungated run): all before
            total[2] += 1
        print("CPU s by process kind: total, before the go (a gated demo's last site extracting meanwhile), processes")
        for kind, (cpu, ahead, n) in sorted(kinds.items(), key=lambda item: -item[1][0]):
            print(f"  {kind:32s} {cpu:6.1f} {ahead:6.1f} {int(n):3d}")
        print(f"  {'all':32s} {sum(v[0] for v in kinds.values()):6.1f} {sum(v[1] for v in kinds.values()):6.1f}")


# what a run's process is, from a part of its command line (the first that matches: `flwr run`'s script names the
# SuperLink in a message)
PROCESS_KINDS = [("radfed demo (the launcher)", "radfed.cli demo"),
                 ("flwr run", "import socket, sys, time"), ("Ray: GCS", "gcs_server"), ("Ray: raylet", "raylet/raylet"),
                 ("Ray: dashboard (minimal)", "dashboard/dashboard.py"), ("Ray: dashboard agent", "dashboard/agent.py"),
                 ("Ray: dashboard agent", "DashboardAgent"), ("Ray: runtime-env agent", "runtime_env/agent"),
                 ("Ray: runtime-env agent", "RuntimeEnvAgent"), ("Ray: log monitor", "log_monitor.py"),
                 ("Ray: autoscaler monitor", "monitor.py"), ("Ray: reaper", "ray_process_reaper"),
                 ("ClientApp actors", "default_worker.py"), ("ClientApp actors", "setup_worker"),
                 ("ClientApp actors", "ray::"), ("Ray head's own process", "Ray head is up"),
                 ("flower-superlink", "flower-superlink"), ("flower-superexec", "flower-superexec"),
                 ("flwr-simulation (ServerApp)", "flwr-simulation"),
                 ("ClientApp workers (the forkserver, its forks)", "multiprocessing.forkserver"),
                 ("multiprocessing's resource tracker", "resource_tracker"),
                 ("the report's drawing child", "server.drawing")]


def federation(work: Path, dirs: list[Path], profile: str, mode: str,
               timeline: bool = False) -> tuple[float, float, Path | None]:
    """One demo run on the warm caches: (wall seconds, launch time (epoch), run folder or None)."""
    out = work / f"runs-{profile}-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    run_config = {**default_config(), "data-root": str(dirs[0].parent), "output-dir": str(out), "profile": profile}
    if mode == "separate":
        run_config["merge-phases"] = False
    approve_demo_plan(dirs, run_config)
    flwr_home = work / f"flwr-{profile}-{mode}"
    shutil.rmtree(flwr_home, ignore_errors=True)
    flwr_home.mkdir(parents=True)
    started, t = time.time(), time.perf_counter()
    with Timeline(flwr_home) if timeline else nullcontext() as sampled:
        run_federation(run_config, num_supernodes=len(dirs), flwr_home=flwr_home, echo=False)
        wall = time.perf_counter() - t
    runs = sorted(out.glob("*-run*"))
    if sampled is not None:
        sampled.print(started, runs[-1] if runs else None)
    return wall, started, (runs[-1] if runs else None)


def cold(work: Path) -> Path:
    """The demo's sites under work/demo-cold (written once, by ``demo_pairs`` or bench_goals), back to cold: no
    cache, ledger, approvals or outbox of an earlier run, but the release secret synth seeded (radfed/synth.py), so
    every run splits the same way. Both halves of a pair start from here: the same files, equally long on disk."""
    data = work / "demo-cold"
    for site in data.glob("hospital-*"):
        kept = {path: path.read_bytes() for path in (site / ".radfed").rglob("secret")}
        shutil.rmtree(site / ".radfed", ignore_errors=True)
        for path, secret in kept.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(secret)
            path.chmod(0o600)
    return data


# The extraction alone as the demo runs it, in a process of its own: the same pool (site_pool, 2 sites at a time)
# on the same sites in the same order, from the interpreter's start to its exit, as the demo's wall is timed
ALONE = ("import sys; from pathlib import Path; from radfed.cli.coordinator import extract_sites; from radfed import "
         "synth; done = extract_sites(synth.make_demo(Path(sys.argv[1]), seed=0), 'default', int(sys.argv[2])); "
         "print(sum(r[1] for r in done))")


def extraction_alone(root: Path, work: Path) -> tuple[float, int]:
    """The checkout at ``root`` extracting the demo's sites under ``work`` from cold caches, with nothing else, in a
    process of its own (``ALONE``): (wall seconds from its start to its exit, usable cases)."""
    data = cold(work)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", ALONE, str(data), str(CORES)], cwd=root, capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"the extraction alone of {root} failed:\n{done.stderr[-3000:]}")
    return wall, int(done.stdout.split()[-1])


def demo_run(root: Path, work: Path, tag: str, timeline: bool = False) -> dict[str, float | str]:
    """One ``radfed demo`` (the ``make demo`` path) of the checkout at ``root`` on the demo's sites under ``work``,
    from cold caches: its whole wall seconds (the process, imports included), the extraction and the federation
    after it as the demo reports them, and the load at its start. Its run folder stays under work/demo-runs/tag."""
    data = cold(work)
    out, flwr_home = work / "demo-runs" / tag, work / "demo-flwr" / tag
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(flwr_home, ignore_errors=True)
    # as `make demo` does before it starts the demo (Makefile, BYTECODE), not timed
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-x", "/\\.", "."], cwd=root, check=True)
    load = os.getloadavg()[0]
    started, t = time.time(), time.perf_counter()
    with Timeline(flwr_home) if timeline else nullcontext() as sampled:
        proc = subprocess.Popen([sys.executable, "-m", "radfed.cli", "demo", "--data-root", str(data), "--output-dir",
                                 str(out), "--flwr-home", str(flwr_home), "--quiet"],
                                cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if sampled is not None:
            sampled.pids.add(proc.pid)
        stdout, stderr = proc.communicate()
        done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        wall = time.perf_counter() - t
    if sampled is not None:  # in seconds from the demo's start; the gate's opening is the start-gate file's mtime
        runs = sorted(out.glob("*-run*"))
        gate = flwr_home / "start-gate"
        print(f"timeline of {root} (demo started at 0; extraction and federation as the demo reports below)")
        sampled.print(started, runs[-1] if runs else None,
                      [(gate.stat().st_mtime, "gate opened")] if gate.exists() else [])
    said = re.search(r"run (\w+) in \d+s: extraction ([\d.]+)s, federation ([\d.]+)s", done.stdout)
    if done.returncode != 0 or said is None:
        sys.exit(f"the demo of {root} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {"root": str(root), "load": load, "wall": wall, "status": said.group(1),
            "extraction": float(said.group(2)), "federation": float(said.group(3)),
            **after_go(flwr_home / "start-gate", sorted(out.glob("*-run*"))[-1], started + wall)}


def after_go(gate: Path, folder: Path, ended: float) -> dict[str, float]:
    """A gated demo's seconds from the go (the gate file's time) on: to the ServerApp's first audit entry, its run
    (first entry to run-end; of it the main run to the folds' start, the folds, the outputs), and from run-end to
    the demo's process gone (Flower's simulation and Ray stopping)."""
    if not gate.exists():
        return {}
    go = gate.stat().st_mtime
    entries = [json.loads(line) for line in (folder / "audit.jsonl").read_text(encoding="utf-8").splitlines()]
    first, end = _time(entries[0]), _time(entries[-1])
    folds = [_time(e) for e in entries if e["event"] in ("fold-start", "folds-end")]
    return {"go to run-start": first - go, "run": end - first,
            "main": (min(folds) if folds else end) - first, "folds": (max(folds) - min(folds)) if folds else 0.0,
            "outputs": end - (max(folds) if folds else end), "run-end to exit": ended - end}


AFTER_GO = ("go to run-start", "main", "folds", "outputs", "run-end to exit")  # after_go's columns in the table


def demo_pairs(roots: list[Path], work: Path, pairs: int, timeline: bool = False) -> int:
    """``--demo``: the whole ``radfed demo`` from cold caches, the checkouts at ``roots`` interleaved (before,
    after, before, after, ...): the demo's own wall is what overlapping the federation's start with the extraction
    changes, so the overhead is that wall minus the extraction alone (the extraction of a run that does not start
    its federation early, e.g. main's)."""
    synth.make_demo(work / "demo-cold", seed=0)
    rows = []
    for i in range(pairs):
        for root in roots:
            got = demo_run(root, work, f"{i}-{roots.index(root)}", timeline)
            print(json.dumps({"pair": i, **got}), flush=True)
            rows.append([str(i), str(root), f"{got['load']:.1f}", f"{got['wall']:.1f}", f"{got['extraction']:.1f}",
                         f"{got['federation']:.1f}", *[f"{float(got.get(k, 0.0)):.2f}" for k in AFTER_GO],
                         str(got["status"])])
    print_columns(f"The whole demo from cold caches, interleaved (work folder {work})",
                  ["pair", "checkout", "load", "demo wall s", "extraction s (as reported)",
                   "federation s after it", *[f"{k} s" for k in AFTER_GO], "status"], rows)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="working folder (default: a fresh temporary one)")
    parser.add_argument("--profiles", default="default,extended")
    parser.add_argument("--scale", type=float, default=1.0, help="demo case counts x this (1 = 170 cases)")
    parser.add_argument("--modes", default="merged", help="merged (merge-phases on), separate (off), or both")
    parser.add_argument("--reuse-extraction", action="store_true",
                        help="keep the caches and the cold extraction time an earlier run in --work measured")
    parser.add_argument("--extraction-only", action="store_true", help="no federation: cases per second per core")
    parser.add_argument("--timeline", action="store_true",
                        help="print each run's processes (start, end, CPU s), stream lines and audit entries in time")
    parser.add_argument("--demo", default="", metavar="ROOT[,ROOT]",
                        help="time the whole `radfed demo` of these checkouts from cold caches, interleaved")
    parser.add_argument("--pairs", type=int, default=3, help="with --demo: rounds of the interleaving")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="radfed-overhead-"))
    if args.demo:
        return demo_pairs([Path(r).resolve() for r in args.demo.split(",")], work, args.pairs, args.timeline)
    rows, timing = [], []
    ok = True
    for profile in args.profiles.split(","):
        measured = work / f"extraction-{profile}.json"
        reuse = args.reuse_extraction and measured.exists()
        dirs = _sites(work, profile, args.scale, reuse)
        if reuse:  # an earlier run's cold extraction of the same sites (e.g. to time another code version's runs)
            extraction, cases = json.loads(measured.read_text(encoding="utf-8"))
        else:
            extraction, cases = cold_extraction(dirs, profile)
            measured.write_text(json.dumps([extraction, cases]), encoding="utf-8")
        per_core = cases / (extraction * CORES)
        print(f"{profile}: {cases} usable cases extracted cold in {extraction:.0f} s", flush=True)
        if args.extraction_only:
            rows.append([profile, "", str(cases), "", f"{extraction:.0f}", f"{per_core:.3f}", *[""] * 6])
            print_columns(f"Extraction throughput ({CORES} cores, demo x {args.scale}, work folder {work})",
                          HEADER, rows)
            continue
        for mode in args.modes.split(","):
            wall, started, folder = federation(work, dirs, profile, mode, args.timeline)
            if folder is None:
                rows.append([profile, mode, str(cases), "", f"{extraction:.0f}", f"{per_core:.3f}", f"{wall:.0f}",
                             "", "", "", "", "no run folder"])
                ok = False
                continue
            doc = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
            spent, end = phases(folder, started, started + wall)
            sent = end.get("messages") or {}
            n_sites = max(int(sent.get("sites") or len(dirs)), 1)
            per_site = f"{sent['messages']} ({sent['messages'] / n_sites:.1f})" if sent else ""
            rows.append([profile, mode, str(cases), str((doc.get("features") or {}).get("agreed", "")),
                         f"{extraction:.0f}", f"{per_core:.3f}", f"{wall:.0f}", f"{float(doc.get('seconds') or 0):.0f}",
                         f"{100 * wall / extraction:.0f}%", per_site, str(sent.get("requests", "")), doc["status"]])
            timing.append([profile, mode, *spent])
            ok = ok and doc["status"] == "completed"
            print_columns(f"Extraction throughput and federation overhead ({CORES} cores, demo x {args.scale}, "
                          f"work folder {work})", HEADER, rows)
            print_columns("Where the federation's wall time went (audit log times)", PHASES, timing)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

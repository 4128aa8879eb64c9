"""Extraction throughput and the federation's overhead beside it, per extraction profile: prints tables.

    python bench/bench_overhead.py [--work DIR] [--profiles default,extended] [--scale 1.0] [--modes merged]

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

``--modes merged,separate`` runs the federation with ``merge-phases`` on and off (the messages each sends);
``--reuse-extraction`` keeps the sites' caches and the cold extraction time measured by an earlier run in ``--work``
(to time only the federation, e.g. of another version of the code). ``--extraction-only`` stops after the cold
extraction (cases per second per core alone; the whole extended demo took 887 s on the loaded 2 cores, README).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.demo_run import default_config  # noqa: E402
from bench.table import print_columns  # noqa: E402
from radfed import synth  # noqa: E402
from radfed.cli.coordinator import approve_demo_plan, extract_one_site  # noqa: E402
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
    with ProcessPoolExecutor(max_workers=CORES) as pool:
        done = list(pool.map(extract_one_site, [str(d) for d in dirs], [profile] * len(dirs), [1] * len(dirs)))
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


def federation(work: Path, dirs: list[Path], profile: str, mode: str) -> tuple[float, float, Path | None]:
    """One demo run on the warm caches: (wall seconds, launch time (epoch), run folder or None)."""
    out = work / f"runs-{profile}-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    run_config = {**default_config(), "data-root": str(dirs[0].parent), "output-dir": str(out), "profile": profile}
    if mode == "separate":
        run_config["merge-phases"] = False
    approve_demo_plan(dirs, run_config)
    flwr_home = work / f"flwr-{profile}-{mode}"
    shutil.rmtree(flwr_home, ignore_errors=True)
    started, t = time.time(), time.perf_counter()
    run_federation(run_config, num_supernodes=len(dirs), flwr_home=flwr_home, echo=False)
    wall = time.perf_counter() - t
    runs = sorted(out.glob("*-run*"))
    return wall, started, (runs[-1] if runs else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="working folder (default: a fresh temporary one)")
    parser.add_argument("--profiles", default="default,extended")
    parser.add_argument("--scale", type=float, default=1.0, help="demo case counts x this (1 = 170 cases)")
    parser.add_argument("--modes", default="merged", help="merged (merge-phases on), separate (off), or both")
    parser.add_argument("--reuse-extraction", action="store_true",
                        help="keep the caches and the cold extraction time an earlier run in --work measured")
    parser.add_argument("--extraction-only", action="store_true", help="no federation: cases per second per core")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="radfed-overhead-"))
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
            wall, started, folder = federation(work, dirs, profile, mode)
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

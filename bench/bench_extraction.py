"""Extraction benchmark: radfed's extract_site against bare pyradiomics on the same work; prints one table.

    python bench/bench_extraction.py [--grid default|tiny] [--cases 12] [--repeats 2] [--work DIR] [--profile NAME]

On one synthetic site (``--cases`` cases, half HGG, the default profile or ``--profile``, e.g. ``extended``) it
measures:

- bare pyradiomics: ``sitk.ReadImage`` + ``RadiomicsFeatureExtractor.execute`` for every case x sequence x
  region (shape features once per region, as radfed does), one process;
- radfed ``extract_site`` with 1 worker and a cold cache (reads, checks, hashes inputs, extracts, writes the
  cache, the features CSV and its sidecar): overhead = radfed / bare, goal <= 1.05;
- radfed with 2 workers, cold: speed-up = 1 worker / 2 workers, goal >= 1.8 (needs 2 idle cores);
- radfed re-run on the warm cache: % of the cold 1-worker time, goal <= 2 %.

Runs of the two single-process variants alternate and each row reports the best of ``--repeats`` runs,
so a neighbour's burst of CPU use on a shared machine does not land on one side only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.extract import _extractors, extract_site, quiet_pyradiomics  # noqa: E402
from client.site import Site, load_site  # noqa: E402
from common.profile import Profile, load_profile  # noqa: E402
from radfed import synth  # noqa: E402


def bare_pyradiomics(site: Site, profile: Profile) -> dict[str, dict[str, float]]:
    """What a script calling pyradiomics directly would do for the same cases, sequences and regions."""
    with_shape, without_shape = _extractors(profile)  # the very same extractor settings
    out: dict[str, dict[str, float]] = {}
    for case in site.cases:
        mask = sitk.ReadImage(str(case.mask))
        features: dict[str, float] = {}
        for seq in profile.sequences:
            image = sitk.ReadImage(str(case.images[seq]))
            extractor = with_shape if seq == profile.shape_from else without_shape
            for region, label in profile.regions.items():
                for key, value in extractor.execute(image, mask, label=label).items():  # type: ignore[attr-defined]
                    if not key.startswith("diagnostics_"):
                        prefix = "shape" if "_shape_" in key else seq
                        features[f"{prefix}/{region}/{key}"] = float(value)
        out[case.case_id] = features
    return out


def timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=("default", "tiny"), default="default",
                        help="default: hospital-a's 80x80x32 grid; tiny: the tests' 40x40x16")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default=None, help="working folder (default: a fresh temporary one)")
    parser.add_argument("--profile", default="default", help="a bundled profile with the demo's sequences "
                        "(default or extended) or a YAML file")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="radfed-bench-extract-"))
    profile = load_profile(args.profile)

    base = synth.default_sites()[0] if args.grid == "default" else synth.tiny_sites(1, 1)[0]
    spec = replace(base, name="bench", n_hgg=args.cases // 2, n_bm=args.cases - args.cases // 2)
    t = time.perf_counter()
    site_dir = synth.write_site(work, spec, seed=5)
    print(f"site: {args.cases} {args.grid}-grid cases {spec.size} in {site_dir} ({time.perf_counter() - t:.1f}s)")
    site = load_site(site_dir, profile.sequences)
    quiet_pyradiomics()
    _extractors(profile)  # build (and import) pyradiomics once, outside every timing

    bare_s, radfed_s, workers2_s, cached_s = [], [], [], []
    bare_result: dict[str, dict[str, float]] = {}
    table = None
    for rep in range(args.repeats):
        cold = replace(site, work_dir=work / f"out-1w-{rep}")
        for which in ("radfed", "bare") if rep % 2 == 0 else ("bare", "radfed"):  # alternate who goes first
            if which == "radfed":
                s, (table, _) = timed(extract_site, cold, profile, workers=1)
                radfed_s.append(s)
            else:
                s, bare_result = timed(bare_pyradiomics, site, profile)
                bare_s.append(s)
        s, _ = timed(extract_site, cold, profile, workers=1)  # warm cache: nothing to extract
        cached_s.append(s)
    for rep in range(args.repeats):
        s, _ = timed(extract_site, replace(site, work_dir=work / f"out-2w-{rep}"), profile, workers=2)
        workers2_s.append(s)

    # the same work was done: radfed's features equal bare pyradiomics' exactly
    assert table is not None and not table.problems
    reference = np.array([[bare_result[c][n] for n in table.names] for c in table.case_ids])
    same = bool(np.array_equal(reference, table.values))

    bare, one, two, cached = min(bare_s), min(radfed_s), min(workers2_s), min(cached_s)
    rows = [
        ("bare pyradiomics execute (1 process)", bare, "", "", bare_s),
        ("radfed extract_site, 1 worker, cold", one, f"overhead x{one / bare:.3f}", "<= x1.05", radfed_s),
        ("radfed extract_site, 2 workers, cold", two, f"speed-up x{one / two:.2f}", ">= x1.8", workers2_s),
        ("radfed re-run, warm cache", cached, f"{100 * cached / one:.2f}% of cold", "<= 2%", cached_s),
    ]
    print(f"\nprofile {profile.name} ({profile.short_hash}): {len(table.case_ids)} cases x {len(profile.sequences)} "
          f"sequences x {len(profile.regions)} regions, {len(table.names)} features per case, "
          f"{one / len(table.case_ids):.2f} s per case (1 worker, cold); features identical to bare pyradiomics: "
          f"{same}")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end; best of "
          f"{args.repeats} runs\n")
    widths = (38, 9, 22, 9)
    header = ("measurement", "seconds", "result", "goal")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + "  all runs (s)")
    print("  ".join("-" * w for w in widths) + "  " + "-" * 12)
    for name, seconds, result, goal, runs in rows:
        cells = (name, f"{seconds:.3f}", result, goal)
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + "  "
              + ", ".join(f"{r:.3f}" for r in runs))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

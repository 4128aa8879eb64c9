"""What importing each app costs a fresh process (a simulation's Ray worker or ServerApp, a deployment's
per-message ClientApp process): prints a table.

    python bench/bench_imports.py [--root DIR] [--repeats 3]

For ``client.app``, ``server.app`` and ``radfed.cli``: wall seconds of ``python -c "import <module>"`` (best of
``--repeats``, interpreter start included), the import's own time from ``-X importtime``, and which heavy libraries
(torch, radiomics, SimpleITK, matplotlib, scipy, pandas) it loaded. ``--root`` times another checkout of radfed
(e.g. ``git archive <commit> | tar -x -C DIR``) with the same interpreter, for a before/after.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.table import print_columns  # noqa: E402

MODULES = ("client.app", "server.app", "radfed.cli")
HEAVY = ("torch", "radiomics", "SimpleITK", "matplotlib", "scipy", "pandas")
HEADER = ["module", "wall s (best)", "import s (-X importtime)", "heavy libraries loaded"]


def time_import(root: Path, module: str) -> tuple[float, float, list[str]]:
    """(wall seconds, the module's cumulative import seconds, heavy libraries in sys.modules after it)."""
    probe = (f"import {module}, sys\n"
             f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", probe], cwd=root, capture_output=True,
                         text=True, check=True)
    wall = time.perf_counter() - t
    own = 0.0
    for line in out.stderr.splitlines():  # "import time: self [us] | cumulative | name"
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip() == module:
            own = int(parts[1]) / 1e6
    return wall, own, [m for m in out.stdout.strip().split(",") if m]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(ROOT), help="the radfed checkout to time (default: this one)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.root).resolve()
    rows = []
    for module in MODULES:
        runs = [time_import(root, module) for _ in range(max(args.repeats, 1))]
        wall, own, heavy = min(runs)
        rows.append([module, f"{wall:.2f}", f"{min(r[1] for r in runs):.2f}", ", ".join(heavy) or "none"])
    print_columns(f"Import cost of a fresh process ({root})", HEADER, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

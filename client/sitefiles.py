"""Where a site keeps its local files: the one description of the layout under its ``output_dir``.

Nothing here is ever sent. Every module that reads or writes a site's local file asks ``SiteFiles`` for
its path, so the layout can be read (and changed) in one place::

    <output_dir>/
        cache/<profile-hash-12>/<case>-<tag>.json   per-case features (or failure), keyed by input hashes
        features-<profile-hash-12>.csv / .json      the feature table and its provenance sidecar
        input-hashes.json                           each input file's sha256 by its stamp (client.inputhashes)
        extraction.log, predict.log                 pyradiomics' own logs
        errors.json, check.json                     the last extraction's and site check's reports
        approvals.jsonl, plans/<hash>.json          run-plan decisions; plans refused, kept for review
        outbox.jsonl, receipts.jsonl                everything sent; every global model received
        harmonization/run-<id>.json                 the site's ComBat parameters per run
        release/                                    the release ledger (secret, ledger.json, releases.jsonl)
                                                    and the DP budget ledger (dp-budget.jsonl)
        run-state/run-<id>/<sha256>                 a run's large node state by hash (client.nodestate)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.cases import SiteError


@dataclass(frozen=True)
class SiteFiles:
    root: Path  # the site's output_dir

    def cache_file(self, profile_short_hash: str, name: str) -> Path:
        return self.root / "cache" / profile_short_hash / name

    def features_csv(self, profile_short_hash: str) -> Path:
        return self.root / f"features-{profile_short_hash}.csv"

    @property
    def input_hashes(self) -> Path:
        """Each input file's sha256 by its stamp, so a new process need not hash it again (client.inputhashes)."""
        return self.root / "input-hashes.json"

    @property
    def extraction_log(self) -> Path:
        return self.root / "extraction.log"

    @property
    def predict_log(self) -> Path:
        return self.root / "predict.log"

    @property
    def errors(self) -> Path:
        return self.root / "errors.json"

    @property
    def check(self) -> Path:
        return self.root / "check.json"

    @property
    def approvals(self) -> Path:
        return self.root / "approvals.jsonl"

    @property
    def plans(self) -> Path:
        return self.root / "plans"

    def plan(self, plan_hash: str) -> Path:
        return self.plans / f"{plan_hash}.json"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox.jsonl"

    @property
    def receipts(self) -> Path:
        return self.root / "receipts.jsonl"

    @property
    def harmonization_dir(self) -> Path:
        return self.root / "harmonization"

    def harmonization(self, run_id: int | str) -> Path:
        return self.harmonization_dir / f"run-{run_id}.json"

    @property
    def release(self) -> Path:
        return self.root / "release"

    @property
    def dp_budget(self) -> Path:
        return self.release / "dp-budget.jsonl"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # read once at import: os.umask is process-wide and not thread-safe


def atomic_write(path: Path, text: str, durable: bool = False) -> None:
    """Write a whole file or nothing. The temporary file is unique (mkstemp in the same folder, so
    os.replace stays atomic): two writers of one path (workers, two runs on one site) never collide on it.
    ``durable``: on disk (fsync) before it replaces the old file, for what must survive a power cut."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), _FILE_MODE)  # mkstemp's 0600 would differ from the site's other files
            fh.write(text)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_lines(path: Path, lines: list[str], durable: bool = False) -> None:
    """Append whole lines (each ends in a newline) in one write; ``durable``: on disk (fsync) before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write("".join(lines))
        if durable:
            fh.flush()
            os.fsync(fh.fileno())


def write_unless_same(path: Path, text: str) -> bool:
    """atomic_write unless the file already holds exactly ``text`` (an unchanged file keeps its stamp, so what
    watches it, client.runcache, sees no change); True when written."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, ValueError):
        pass
    atomic_write(path, text)
    return True


def write_json_unless_same(path: Path, doc: dict[str, Any], volatile: str) -> bool:
    """Write ``doc`` (indented JSON) unless the file holds the same document apart from its ``volatile`` key
    (the time it was made); True when written."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(old, dict) and {**old, volatile: None} == {**doc, volatile: None}:
            return False
    except (OSError, ValueError):
        pass
    atomic_write(path, json.dumps(doc, indent=2))
    return True


def read_jsonl(path: Path, valid: Callable[[dict[str, Any]], bool], what: str, fix: str) -> list[dict[str, Any]]:
    """Every entry of an append-only JSON-lines file, in order ([] when it does not exist; blank lines skipped).
    A line that is not a JSON object passing ``valid`` stops the read with a SiteError naming the file, the line,
    ``what`` a line should be and ``fix``: a damaged record must never be skipped silently."""
    if not path.exists():
        return []
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            ok = isinstance(entry, dict) and valid(entry)
        except json.JSONDecodeError as exc:
            raise SiteError(f"{path} line {number} is not {what} ({exc}); {fix}") from None
        if not ok:
            raise SiteError(f"{path} line {number} is not {what}; {fix}")
        entries.append(entry)
    return entries

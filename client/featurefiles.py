"""The site's feature table on disk: ``features-<profile-hash-12>.csv`` and its ``.json`` provenance sidecar.

Written at the end of every extraction or cached load (client.extract). A load that finds the same table writes
nothing: the sidecar records the sha256 of the table it was written from (``table_sha256``) and of the CSV, so an
unchanged CSV is recognised without formatting its ~10^5 floats again. Nothing here leaves the site.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from client.site import Site
from client.sitefiles import write_json_unless_same, write_unless_same
from common.profile import Profile

if TYPE_CHECKING:
    from client.extract import FeatureTable

FEATURES_SCHEMA = "radfed.features/1"


def features_path(site: Site, profile: Profile) -> Path:
    """``<output_dir>/features-<profile-hash-12>.csv``; its provenance sidecar has the same stem, ``.json``."""
    return site.files.features_csv(profile.short_hash)


def save_features(site: Site, profile: Profile, version: str, table: FeatureTable,
                  inputs: Mapping[str, Mapping[str, str]]) -> tuple[Path, Path]:
    """Write the feature table as CSV (case_id, diagnosis, label, one column per feature) and a JSON
    sidecar saying how it was made; returns both paths. Floats are written with repr (exact round trip)."""
    site.work_dir.mkdir(parents=True, exist_ok=True)
    path = features_path(site, profile)
    sidecar_path = path.with_suffix(".json")
    digest = table_sha256(table)
    csv_sha256 = _csv_holding(path, sidecar_path, digest)
    if csv_sha256 is None:
        text = _csv_text(table)
        write_unless_same(path, text)  # an unchanged table is not rewritten (its sidecar keeps its time)
        csv_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    sidecar = {
        "schema": FEATURES_SCHEMA,
        "site": site.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "features_csv": path.name,
        "csv_sha256": csv_sha256,
        "table_sha256": digest,
        "profile": {"name": profile.name, "version": profile.version, "sha256": profile.sha256},
        "pyradiomics": version,
        "source": site.settings.get("source", "manifest"),
        "label_map": {str(k): v for k, v in site.label_map.items()} if site.label_map is not None else None,
        "label_coding": {"HGG": 1, "BM": 0},
        "n_cases": len(table.case_ids),
        "n_features": len(table.names),
        "case_ids": table.case_ids,
        "labels": table.labels.tolist(),
        "inputs_sha256": {case_id: dict(inputs[case_id]) for case_id in table.case_ids},
        "problems": len(table.problems),
    }
    write_json_unless_same(sidecar_path, sidecar, "created")
    return path, sidecar_path


def _csv_text(table: FeatureTable) -> str:
    diagnosis = {1: "HGG", 0: "BM"}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["case_id", "diagnosis", "label", *table.names])
    for case_id, label, row in zip(table.case_ids, table.labels.tolist(), table.values, strict=True):
        writer.writerow([case_id, diagnosis[int(label)], int(label), *map(repr, row.tolist())])
    return out.getvalue()


def table_sha256(table: FeatureTable) -> str:
    """sha256 of what the feature CSV is written from: case ids, labels, names and the values' float64 bytes."""
    digest = hashlib.sha256(json.dumps([table.case_ids, table.labels.tolist(), table.names]).encode("utf-8"))
    digest.update(np.ascontiguousarray(table.values, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _csv_holding(path: Path, sidecar_path: Path, table_digest: str) -> str | None:
    """The CSV's sha256 when the sidecar says it was written from exactly this table and the file still hashes
    to what the sidecar recorded (so it need not be formatted again: ~145k floats on the demo, 0.1-0.2 s per
    site at every worker's first load); None otherwise (then it is written as always)."""
    try:
        old = json.loads(sidecar_path.read_text(encoding="utf-8"))
        if not (isinstance(old, dict) and old.get("table_sha256") == table_digest):
            return None
        held = hashlib.sha256(path.read_bytes()).hexdigest()
    except (OSError, ValueError):
        return None
    return held if held == old.get("csv_sha256") else None

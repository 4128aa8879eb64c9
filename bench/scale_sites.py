"""Simulated hospitals at the feature level, for the scale bench (bench/bench_scale.py) and its test.

A site folder is written exactly as extraction would have left it, so a federation of 1,000 sites needs no
image: a manifest, one small placeholder file per image and mask (unique content, so no two rows are taken for
one patient), one cache entry per case keyed by those files' hashes (client/featurecache.py: the entry a real
extraction would have written, with every stamp), the release secret (seeded, as radfed/synth.py does), and then
the feature CSV, its provenance sidecar and errors.json, written by client.extract.extract_site itself from the
cache (no case is extracted: every entry is reused). A site run afterwards reads only those files.

Features are Gaussian with a class effect on the first ``informative`` features and a per-site scanner effect
(shift and scale on every feature), so ComBat, selection and training have something to do.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np

from client.extract import _input_hashes, extract_site, pyradiomics_version
from client.featurecache import cache_file, new_entry, write_cache
from client.ledger import Ledger
from client.site import load_site
from client.sitefiles import SiteFiles
from common.profile import Profile, load_profile
from common.protocol import DEFAULT_K

HEADER = ("case_id", "diagnosis", "t1c", "flair", "adc", "mask")


def feature_names(profile: Profile, n_features: int) -> list[str]:
    """Names in extraction's form (sequence/region/feature), spread over the profile's sequences and regions."""
    slots = [(seq, region) for seq in profile.sequences for region in profile.regions]
    return [f"{slots[j % len(slots)][0]}/{slots[j % len(slots)][1]}/original_firstorder_Synthetic{j:03d}"
            for j in range(n_features)]


def write_feature_site(root: Path, name: str, n_per_class: int, n_features: int, seed: int,
                       profile: Profile, informative: int = 10) -> Path:
    """One site folder under ``root`` holding what extraction would have cached; returns the folder."""
    folder = Path(root) / name
    rng = np.random.default_rng(seed)
    names = feature_names(profile, n_features)
    labels = rng.permutation(np.r_[np.ones(n_per_class, int), np.zeros(n_per_class, int)])
    effect = np.r_[np.linspace(1.0, 0.3, min(informative, n_features)), np.zeros(max(n_features - informative, 0))]
    shift, scale = rng.normal(0.0, 0.5, n_features), rng.uniform(0.7, 1.4, n_features)
    values = (rng.normal(size=(len(labels), n_features)) + labels[:, None] * effect) * scale + shift
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, label in enumerate(labels, start=1):
        case_id = f"{name}-{i:03d}"
        rel = {key: f"images/{case_id}_{key}.txt" for key in HEADER[2:]}
        for key, path in rel.items():  # unique bytes per file: rows sharing image content would be one patient
            (folder / path).write_text(f"radfed scale placeholder {name} {case_id} {key}\n", encoding="utf-8")
        rows.append([case_id, "HGG" if label else "BM", *rel.values()])
    tmp = folder / "manifest.csv.tmp"
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(rows)
    os.replace(tmp, folder / "manifest.csv")
    Ledger(SiteFiles(folder / ".radfed").release, DEFAULT_K).seed_secret(
        hashlib.sha256(f"radfed scale site {name} {seed}".encode()).digest())
    site, version = load_site(folder, profile.sequences), pyradiomics_version()
    by_id = {f"{name}-{i:03d}": row for i, row in enumerate(values, start=1)}
    for case in site.cases:
        features = dict(zip(names, by_id[case.case_id].tolist(), strict=True))
        write_cache(cache_file(site, profile, case.case_id),
                    new_entry(case.case_id, _input_hashes(case, site.label_map), profile, version, features, None))
    table, summary = extract_site(site, profile)  # every case from the cache: writes the CSV, sidecar, errors.json
    if summary.extracted or summary.cached != len(labels) or len(table.case_ids) != len(labels):
        raise RuntimeError(f"{name}: {summary.cached} of {len(labels)} cases came from the cache")
    return folder


def write_feature_sites(root: Path, n_sites: int, n_per_class: int = 16, n_features: int = 60,
                        seed: int = 0, profile_name: str = "default") -> list[Path]:
    """``n_sites`` sites named site-0001 ... under ``root`` (reused when complete: the sidecar exists)."""
    profile = load_profile(profile_name)
    folders = []
    for i in range(n_sites):
        name = f"site-{i + 1:04d}"
        folder = Path(root) / name
        done = (folder / ".radfed" / f"features-{profile.short_hash}.json").is_file()
        folders.append(folder if done else write_feature_site(root, name, n_per_class, n_features,
                                                              seed * 100_003 + i, profile))
    return folders

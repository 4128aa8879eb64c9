"""The scale bench's feature-level sites (bench/scale_sites.py): a site reads them as its own extraction's cache."""

from __future__ import annotations

import json

import numpy as np

from bench.scale_sites import feature_names, write_feature_sites
from client.extract import extract_site, features_path
from client.site import load_site
from client.steps import features_reply, load_site_data
from common.profile import load_profile
from radfed.launch import app_run_config


def test_feature_level_sites_load_as_an_extraction_cache_without_any_image(tmp_path):
    profile = load_profile("default")
    [a, b] = write_feature_sites(tmp_path, 2, n_per_class=12, n_features=20, seed=3)
    for folder in (a, b):
        site = load_site(folder, profile.sequences)
        table, summary = extract_site(site, profile)  # what a site does at its first message
        assert (summary.extracted, summary.cached, len(table.problems)) == (0, 24, 0)
        assert table.names == sorted(feature_names(profile, 20)) and np.isfinite(table.values).all()
        sidecar = json.loads(features_path(site, profile).with_suffix(".json").read_text(encoding="utf-8"))
        assert sidecar["profile"]["sha256"] == profile.sha256 and sidecar["n_cases"] == 24
        assert sidecar["inputs_sha256"][table.case_ids[0]]["t1c"] != "missing"  # keyed by real files' hashes
    data = load_site_data(a, app_run_config({}))
    names, counts = features_reply(data)
    assert len(names) == 20 and counts["n-train-hgg"] + counts["n-test-hgg"] == 12
    # the sites differ (a scanner effect each) and the classes differ (the first features carry the diagnosis)
    other = load_site_data(b, app_run_config({}))
    assert not np.allclose(data.table.values.mean(axis=0), other.table.values.mean(axis=0))
    first = data.table.names.index(feature_names(profile, 20)[0])
    y = data.table.labels
    assert abs(data.table.values[y == 1, first].mean() - data.table.values[y == 0, first].mean()) > 0.3
    # written again, a complete site is reused as it is
    before = (a / "manifest.csv").stat().st_mtime_ns
    write_feature_sites(tmp_path, 2, n_per_class=12, n_features=20, seed=3)
    assert (a / "manifest.csv").stat().st_mtime_ns == before


def test_a_simulated_node_finds_its_site_without_listing_the_root_every_message(tmp_path, monkeypatch):
    import time
    from pathlib import Path

    from client import runcache
    from client.steps import locate_site
    from common.runconfig import parse

    write_feature_sites(tmp_path, 3, n_per_class=6, n_features=4)
    run = parse(app_run_config({"data-root": str(tmp_path)}))
    time.sleep(1.1)  # runcache trusts a listing made more than a second after the folder last changed
    runcache.clear()
    listed = []
    real = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: listed.append(self) or real(self))
    assert [locate_site({"partition-id": i}, run).name for i in range(3)] == ["site-0001", "site-0002", "site-0003"]
    assert listed.count(tmp_path) == 1  # once per process, not once per message
    (tmp_path / "site-0000").mkdir()  # a new site folder (sorted first) changes the root: listed again
    (tmp_path / "site-0000" / "manifest.csv").write_text("case_id,diagnosis\n", encoding="utf-8")
    assert locate_site({"partition-id": 0}, run).name == "site-0000" and listed.count(tmp_path) == 2

"""The site's feature CSV and sidecar (client.featurefiles): a reload that finds the same table writes nothing and
formats nothing, yet a CSV changed by hand is written again from the table."""

from __future__ import annotations

import json

from client import runcache
from client.extract import extract_site, features_path
from client.featurefiles import table_sha256
from client.site import load_site
from common.profile import load_profile
from radfed import synth


def test_a_csv_changed_by_hand_is_written_again(tmp_path):
    profile = load_profile()
    folder = synth.write_site(tmp_path, synth.tiny_sites(1, 6)[0], seed=2)
    table, _ = extract_site(load_site(folder, profile.sequences), profile)
    path = features_path(load_site(folder, profile.sequences), profile)
    written = path.read_bytes()
    sidecar = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    assert sidecar["table_sha256"] == table_sha256(table)
    stamp = runcache.stamp(path)
    extract_site(load_site(folder, profile.sequences), profile)
    assert runcache.stamp(path) == stamp  # the same table: the CSV is left as it is
    path.write_bytes(written.replace(b",", b";", 5))
    again, _ = extract_site(load_site(folder, profile.sequences), profile)
    assert path.read_bytes() == written and table_sha256(again) == sidecar["table_sha256"]

"""A site's input hashes recorded across processes (client.inputhashes): a new process hashes no unchanged file,
and still hashes again, and re-extracts, a file changed since, even one rewritten with its old size and mtime.
Each load runs in a fresh interpreter, as each simulation worker does: real files, real extraction."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client import inputhashes, runcache
from client.site import load_site
from common.canon import file_sha256
from common.profile import load_profile
from radfed import synth

ROOT = Path(__file__).resolve().parent.parent
# one load of the site in a fresh interpreter: which files it hashed, and the feature table it got
LOAD = """
import hashlib, json, sys
from pathlib import Path
from client import extract, inputhashes
from client.site import load_site
from common.profile import load_profile
hashed = []
real = inputhashes.file_sha256
def counting(path):
    hashed.append(str(path))
    return real(path)
inputhashes.file_sha256 = counting
profile = load_profile()
table, summary = extract.extract_site(load_site(sys.argv[1], profile.sequences), profile)
print(json.dumps({"hashed": hashed, "extracted": summary.extracted,
                  "table": hashlib.sha256(table.values.tobytes()).hexdigest()}))
"""


def load_in_new_process(site: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, str(site)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputhashes")
    site = synth.write_site(root, synth.tiny_sites(1, 6)[0], seed=3)
    load_in_new_process(site)  # extracted: the images were written just before, so nothing is recorded yet
    return site


@pytest.fixture
def site(extracted, tmp_path) -> Path:
    copy = tmp_path / extracted.name
    shutil.copytree(extracted, copy)  # new inodes and ctimes: nothing the original recorded applies here
    time.sleep(2 * runcache.SETTLE_FINE_NS / 1e9)
    return copy


def _inputs(site: Path) -> list[Path]:
    cases = load_site(site, load_profile().sequences).cases
    return [p for c in cases for p in (*c.images.values(), c.mask)]


def test_a_new_process_hashes_no_unchanged_file(site):
    first = load_in_new_process(site)
    assert sorted(first["hashed"]) == sorted(map(str, _inputs(site)))  # a copy: every file hashed once
    recorded = json.loads((site / ".radfed/input-hashes.json").read_text(encoding="utf-8"))["files"]
    assert {r[0]: r[5] for r in recorded} == {str(p): file_sha256(p) for p in _inputs(site)}
    second = load_in_new_process(site)
    assert second["hashed"] == [] and second["extracted"] == 0 and second["table"] == first["table"]


def _rewrite(path: Path, content: bytes) -> None:
    """Write ``content`` into ``path`` in place (same inode) and set its mtime back: only ctime tells."""
    before = os.stat(path)
    path.write_bytes(content)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    time.sleep(2 * runcache.SETTLE_FINE_NS / 1e9)


def test_a_changed_file_is_hashed_and_extracted_again(site):
    first = load_in_new_process(site)
    image = _inputs(site)[0]
    voxels = bytearray(gzip.decompress(image.read_bytes()))
    voxels[-3] ^= 0x40  # one voxel of the last slice
    _rewrite(image, gzip.compress(bytes(voxels), mtime=0))
    again = load_in_new_process(site)
    assert again["hashed"] == [str(image)]
    assert again["extracted"] == 1 and again["table"] != first["table"]
    recorded = json.loads((site / ".radfed/input-hashes.json").read_text(encoding="utf-8"))["files"]
    assert {r[0]: r[5] for r in recorded}[str(image)] == file_sha256(image)


def test_a_rewrite_with_the_same_size_and_mtime_is_hashed_again(site):
    """Same bytes, same size, same inode, mtime set back: the stamp's ctime still differs, so the file is hashed
    again (and, being the same, its features are reused)."""
    load_in_new_process(site)
    mask = _inputs(site)[1]
    _rewrite(mask, mask.read_bytes())
    again = load_in_new_process(site)
    assert again["hashed"] == [str(mask)] and again["extracted"] == 0


def test_a_file_hashed_right_after_a_write_is_not_recorded(tmp_path, monkeypatch):
    site = load_site(synth.write_site(tmp_path, synth.tiny_sites(1, 6)[0], seed=4), load_profile().sequences)
    image = site.cases[0].mask
    image.write_bytes(image.read_bytes())  # just written: its stamp may not show a write in the same clock tick
    monkeypatch.setattr(runcache, "SETTLE_FINE_NS", 3600 * 10**9)  # "just": however slow this machine is
    inputhashes.file_hash(image)
    inputhashes.record(site, [image])
    doc = json.loads(site.files.input_hashes.read_text(encoding="utf-8"))
    assert doc["files"] == []

"""Shared fixtures: tiny synthetic sites written with the real generator and SimpleITK."""

from pathlib import Path

import pytest

from radfed import synth


@pytest.fixture(scope="session")
def tiny_site_root(tmp_path_factory) -> Path:
    """One tiny site with 9 cases of each class (the smallest size that passes k = 5 with a 30% split)."""
    root = tmp_path_factory.mktemp("tiny")
    synth.write_site(root, synth.tiny_sites(1, 9)[0], seed=11)
    return root

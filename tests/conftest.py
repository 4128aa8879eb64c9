"""Shared fixtures: tiny synthetic sites written with the real generator and SimpleITK."""

from pathlib import Path

import pytest

from radfed import synth


@pytest.fixture(scope="session")
def tiny_site_root(tmp_path_factory) -> Path:
    """One tiny site with 12 cases of each class: two release blocks of k = 5 per class, with room for two broken
    cases."""
    root = tmp_path_factory.mktemp("tiny")
    synth.write_site(root, synth.tiny_sites(1, 12)[0], seed=11)
    return root

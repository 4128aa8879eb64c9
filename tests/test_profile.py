"""Profile loading and hashing: the hash follows values, not formatting."""

import json
from pathlib import Path

import pytest
import yaml

from common.profile import ProfileError, bundled_profiles, load_profile, profile_from_dict

BUNDLED = Path(__file__).resolve().parent.parent / "common" / "profiles" / "default.yaml"


def test_bundled_profile_loads_with_its_regions_and_sequences():
    profile = load_profile("default")
    assert profile.sequences == ("t1c", "flair", "adc")
    assert profile.regions == {"enhancing": 1, "necrosis": 2, "edema": 3}
    assert len(profile.sha256) == 64 and profile.sha256 == load_profile(BUNDLED).sha256


def test_hash_ignores_comments_order_and_whitespace(tmp_path):
    doc = yaml.safe_load(BUNDLED.read_text())
    reordered = {k: doc[k] for k in reversed(list(doc))}
    path = tmp_path / "same.yaml"
    path.write_text("# another comment\n" + yaml.safe_dump(reordered, sort_keys=False, indent=4))
    assert load_profile(path).sha256 == load_profile("default").sha256


@pytest.mark.parametrize("edit", [
    lambda d: d["setting"].__setitem__("binWidth", 11),
    lambda d: d["radfed"].__setitem__("version", "1.0.1"),
    lambda d: d["featureClass"].pop("ngtdm"),
    lambda d: d["setting"]["resampledPixelSpacing"].__setitem__(2, 3.0),
])
def test_hash_changes_with_any_value(edit):
    doc = yaml.safe_load(BUNDLED.read_text())
    edit(doc)
    assert profile_from_dict(doc).sha256 != load_profile("default").sha256


@pytest.mark.parametrize("text, needle", [
    ("radfed: [unclosed", "not valid YAML"),
    ("setting: {}\nimageType: {}\nfeatureClass: {}\n", "no 'radfed' block"),
    ("radfed: {name: x, version: '1', sequences: [t1c], regions: {tumour: 0}}\nimageType: {}\nfeatureClass: {}\n",
     "positive integer label"),
    ("radfed: {name: x, version: '1', sequences: [t1c], regions: {a: 1, b: 1}}\nimageType: {}\nfeatureClass: {}\n",
     "share a label"),
])
def test_malformed_profiles_name_the_problem(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=needle):
        load_profile(path)


def test_unknown_profile_name_lists_the_known_ones():
    with pytest.raises(ProfileError, match=r"unknown profile 'nope'.*default"):
        load_profile("nope")


def test_bundled_profiles_are_selectable_by_file_name_and_by_own_name():
    """Every shipped profile loads, its own name and its file name lead to it, and no name means two files."""
    profiles = bundled_profiles()
    assert "default" in {Path(p.source).stem for p in profiles}
    own = [p.name for p in profiles]
    assert len(set(own)) == len(own), own
    for profile in profiles:  # an own name that is another file's name would select that file instead
        assert profile.name not in {Path(p.source).stem for p in profiles if p is not profile}
    for profile in profiles:
        assert load_profile(profile.name).sha256 == load_profile(Path(profile.source).stem).sha256 == profile.sha256


def test_an_own_name_shared_by_two_profiles_is_refused_naming_both(tmp_path, monkeypatch):
    for stem in ("first", "second"):
        (tmp_path / f"{stem}.yaml").write_text(BUNDLED.read_text())
    monkeypatch.setattr("common.profile.PROFILE_DIR", tmp_path)
    with pytest.raises(ProfileError, match=r"'hgg-vs-bm' is given by several bundled files \(first, second\)"):
        load_profile("hgg-vs-bm")
    assert load_profile("first").sha256 == load_profile("second").sha256


def test_every_bundled_profile_is_valid_pyradiomics_params():
    """pyradiomics validates its params against its own schema as it builds the extractor: a typo in a bundled
    profile (an unknown setting, image type or feature) fails here, not at every site."""
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    for profile in bundled_profiles():
        extractor = RadiomicsFeatureExtractor(json.loads(json.dumps(profile.params)))
        assert set(extractor.enabledImagetypes) == set(profile.params["imageType"]), profile.name
        assert set(extractor.enabledFeatures) == set(profile.params["featureClass"]), profile.name

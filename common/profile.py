"""Extraction profiles: load, canonicalise and hash the federation's pyradiomics settings.

A profile is one YAML file: a ``radfed`` block (name, version, sequences, region labels) plus
pyradiomics' own ``setting`` / ``imageType`` / ``featureClass`` params. Its hash is the sha256 of a
canonical JSON form, so comments, key order and whitespace do not change it but any value does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.canon import sha256_json

PROFILE_DIR = Path(__file__).parent / "profiles"
PYRADIOMICS_KEYS = ("setting", "imageType", "featureClass")


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Perturbation:
    """One perturbation of a case before pyradiomics (client.perturb applies it).

    ``kind``: "noise" (Gaussian, ``amount`` = sigma as a fraction of the image's std inside the mask),
    "translate" (image and mask shifted together by ``amount`` mm in a random direction, resampled on the
    original grid), "rotate" (image and mask rotated about the mask's centre by up to ``amount`` degrees about a
    random axis), "dilate" / "erode" (each region grown into the background / shrunk by ``amount`` voxels).
    """

    kind: str
    amount: float

    @property
    def random(self) -> bool:
        return self.kind in ("noise", "translate", "rotate")

    def describe(self) -> str:
        unit = {"noise": " x the ROI std", "translate": " mm", "rotate": " degrees", "dilate": " voxel(s)",
                "erode": " voxel(s)"}[self.kind]
        return f"{self.kind} {self.amount:g}{unit}"


@dataclass(frozen=True)
class Robustness:
    """The profile's ``robustness`` block: perturbations, how often each random one is drawn, and the seed
    every site derives its per-case draws from (with the case's content hash: no site secret needed)."""

    perturbations: tuple[Perturbation, ...]
    repeats: int
    seed: int

    def draws(self) -> list[Perturbation]:
        """Every perturbed copy of a case, in order: each random perturbation ``repeats`` times, each mask
        operation once (it is deterministic)."""
        return [p for p in self.perturbations for _ in range(self.repeats if p.random else 1)]

    @property
    def measurements(self) -> int:
        """m: the original plus every perturbed copy."""
        return 1 + len(self.draws())


_AMOUNT_KEY = {"noise": "sigma", "translate": "mm", "rotate": "degrees"}


def _robustness(block: Any, source: str) -> Robustness | None:
    """Validate the optional ``robustness`` block; raises ProfileError naming the entry and the fix."""
    if block is None:
        return None
    example = ("e.g. robustness: {perturbations: [{kind: noise, sigma: 0.05}, {kind: mask, erode: 1}], "
               "repeats: 1, seed: 0}")
    if not isinstance(block, dict) or set(block) - {"perturbations", "repeats", "seed"}:
        raise ProfileError(f"profile {source}: 'robustness' must hold only perturbations, repeats, seed ({example})")
    items = block.get("perturbations")
    if not isinstance(items, list) or not items:
        raise ProfileError(f"profile {source}: 'robustness.perturbations' must be a non-empty list ({example})")
    repeats, seed = block.get("repeats", 1), block.get("seed", 0)
    for key, value in (("repeats", repeats), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "repeats" else 0):
            raise ProfileError(f"profile {source}: 'robustness.{key}' must be a whole number "
                               f"{'>= 1' if key == 'repeats' else '>= 0'}, got {value!r}")
    parsed = []
    for i, item in enumerate(items):
        kind = item.get("kind") if isinstance(item, dict) else None
        if kind == "mask":
            ops = [k for k in ("dilate", "erode") if k in item]
            if len(ops) != 1 or set(item) != {"kind", ops[0]}:
                raise ProfileError(f"profile {source}: robustness perturbation {i + 1} (mask) needs exactly one "
                                   "of 'dilate: N' or 'erode: N'")
            name, key = ops[0], ops[0]
        elif kind in _AMOUNT_KEY:
            name, key = kind, _AMOUNT_KEY[kind]
            if set(item) != {"kind", key}:
                raise ProfileError(f"profile {source}: robustness perturbation {i + 1} ({kind}) needs exactly "
                                   f"'{key}: <number>'")
        else:
            raise ProfileError(f"profile {source}: robustness perturbation {i + 1} has kind {kind!r}: use one of "
                               "noise, translate, rotate, mask")
        amount = item[key]
        integral = name in ("dilate", "erode")
        if isinstance(amount, bool) or not isinstance(amount, int if integral else int | float) or amount <= 0:
            raise ProfileError(f"profile {source}: robustness perturbation {i + 1}: '{key}' must be a positive "
                               f"{'whole number' if integral else 'number'}, got {amount!r}")
        parsed.append(Perturbation(name, float(amount)))
    return Robustness(tuple(parsed), int(repeats), int(seed))


@dataclass(frozen=True)
class Profile:
    """A loaded extraction profile.

    Attributes:
        name, version: from the ``radfed`` block.
        sequences: image sequences every case must have, e.g. ``("t1c", "flair", "adc")``.
        regions: region name -> mask label, e.g. ``{"enhancing": 1, ...}``.
        shape_from: the sequence whose extraction contributes the (mask-only) shape features.
        params: the pyradiomics params dict (``setting``, ``imageType``, ``featureClass``).
        sha256: hash of the canonical form of the whole profile (the ``robustness`` block included).
        source: where it was loaded from.
        robustness: the perturbations the robustness filter measures features under (None: not declared).
    """

    name: str
    version: str
    sequences: tuple[str, ...]
    regions: dict[str, int]
    shape_from: str
    params: dict[str, Any]
    sha256: str
    source: str
    robustness: Robustness | None = None


    @property
    def short_hash(self) -> str:
        return self.sha256[:12]


def profile_hash(doc: dict[str, Any]) -> str:
    """sha256 of the canonical JSON form of the whole profile (``radfed`` block included)."""
    return sha256_json(doc)


def _own_name(path: Path) -> str | None:
    """The ``radfed.name`` a profile file gives itself, or None when it cannot be read."""
    try:
        return str(yaml.safe_load(path.read_text(encoding="utf-8"))["radfed"]["name"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """A bundled profile by file name (``"default"``) or by its own ``radfed.name`` (``"hgg-vs-bm"``, the name
    every command prints), else a path to a YAML file."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    bundled = PROFILE_DIR / f"{name_or_path}.yaml"
    if bundled.exists():
        return bundled
    files = sorted(PROFILE_DIR.glob("*.yaml"))
    named = [p for p in files if _own_name(p) == str(name_or_path)]
    if len(named) == 1:
        return named[0]
    if named:
        raise ProfileError(f"profile name {name_or_path!r} is given by several bundled files "
                           f"({', '.join(p.stem for p in named)}): select one by its file name")
    if candidate.is_file():  # a profile file named without a .yaml suffix
        return candidate
    known = ", ".join(f"{p.stem} ({_own_name(p)})" for p in files)
    raise ProfileError(f"unknown profile {name_or_path!r}: use a bundled one by file or own name [{known}] "
                       "or a path to a .yaml file")


def bundled_profiles() -> list[Profile]:
    """Every profile shipped in ``common/profiles/``, by file name; raises ProfileError naming a bad one."""
    return [load_profile(path) for path in sorted(PROFILE_DIR.glob("*.yaml"))]


def load_profile(name_or_path: str | Path = "default") -> Profile:
    """Load and validate a profile; raises ProfileError naming the file and what to fix.

    The file is read every time, its YAML parsed once per text in a process (a simulation worker serving 1,000
    sites parsed the same profile for every site's first message: 0.1 s each); an edited file is parsed anew."""
    path = resolve_profile_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ProfileError(f"profile file {path} does not exist: check the path in your configuration") from exc
    return _parse(str(path), text)


@functools.lru_cache(maxsize=64)  # keyed by the text, so an edited file is parsed anew
def _parse(source: str, text: str) -> Profile:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"profile {source} is not valid YAML ({exc}); fix the syntax") from exc
    return profile_from_dict(doc, source=source)


def profile_from_dict(doc: Any, source: str = "<dict>") -> Profile:
    if not isinstance(doc, dict):
        raise ProfileError(f"profile {source} must be a mapping with 'radfed', 'setting', 'imageType', 'featureClass'")
    meta = doc.get("radfed")
    if not isinstance(meta, dict):
        raise ProfileError(f"profile {source} has no 'radfed' block: add name, version, sequences, regions")
    for key in ("name", "version", "sequences", "regions"):
        if key not in meta:
            raise ProfileError(f"profile {source}: 'radfed.{key}' is missing")
    sequences = tuple(str(s) for s in meta["sequences"])
    if not sequences:
        raise ProfileError(f"profile {source}: 'radfed.sequences' is empty")
    regions = meta["regions"]
    if not isinstance(regions, dict) or not regions:
        raise ProfileError(f"profile {source}: 'radfed.regions' must map region names to mask labels")
    for region, label in regions.items():
        if not isinstance(label, int) or isinstance(label, bool) or label <= 0:
            raise ProfileError(f"profile {source}: region {region!r} needs a positive integer label, got {label!r}")
    if len(set(regions.values())) != len(regions):
        raise ProfileError(f"profile {source}: two regions share a label in 'radfed.regions'")
    shape_from = str(meta.get("shape_from", sequences[0]))
    if shape_from not in sequences:
        raise ProfileError(f"profile {source}: 'radfed.shape_from' ({shape_from}) is not one of {list(sequences)}")
    if "featureClass" not in doc or "imageType" not in doc:
        raise ProfileError(f"profile {source}: pyradiomics 'imageType' and 'featureClass' are required")
    params = {k: doc[k] for k in PYRADIOMICS_KEYS if k in doc}
    return Profile(
        name=str(meta["name"]),
        version=str(meta["version"]),
        sequences=sequences,
        regions={str(k): int(v) for k, v in regions.items()},
        shape_from=shape_from,
        params=params,
        sha256=profile_hash(doc),
        source=source,
        robustness=_robustness(doc.get("robustness"), source),
    )

"""The robustness filter at a site: its training cases extracted again under the profile's perturbations
(client.perturb), cached like the originals, and the ICC sums the site sends (common.icc).

Cache: ``<output_dir>/cache/<profile-hash-12>/<case>-<tag>.perturbed.json``, one entry per case holding every
perturbed copy's features, reused only when the input hashes, the profile hash (which covers the perturbations
and their seed) and the pyradiomics version all match. Nothing here leaves the site but the sums.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client.checks import MIN_REGION_VOXELS, CaseInputError, load_case_volumes
from client.extract import _input_hashes, _log_to, extract_volumes, pyradiomics_version
from client.featurecache import cache_file, write_cache
from client.perturb import draw_seed, perturb_case
from client.site import Case, Site, SiteError
from client.steps import SiteData
from common import icc
from common.profile import Perturbation, Profile

log = logging.getLogger("flwr.radfed.robustness")
file_log = logging.getLogger("radfed.extraction")
Copies = list[dict[str, float]]  # one feature dict per perturbed copy (a failed sequence/region: absent)


def perturbed_cache_file(site: Site, profile: Profile, case_id: str) -> Path:
    path = cache_file(site, profile, case_id)
    return path.with_name(path.stem + ".perturbed.json")


def extract_perturbed(case: Case, profile: Profile, inputs: dict[str, str],
                      label_map: dict[int, str] | None = None) -> Copies:
    """Features of every perturbed copy of one case (profile.robustness.draws(), in order). A region a mask
    operation would destroy (eroded below pyradiomics' minimum size) keeps its own contour in that copy; any other
    sequence/region pyradiomics cannot extract in a copy is left out of it, so its features count as not
    measurable. A case whose files no longer pass the input checks raises CaseInputError."""
    if profile.robustness is None:
        raise SiteError(f"profile {profile.name} declares no robustness perturbations")
    volumes, mask = load_case_volumes(case.images, case.mask, profile.regions, MIN_REGION_VOXELS, label_map)
    labels = list(profile.regions.values())
    copies: Copies = []
    for index, perturbation in enumerate(profile.robustness.draws()):
        moved, moved_mask = perturb_case(volumes, mask, labels, perturbation,
                                         draw_seed(profile.robustness.seed, inputs, index))

        def on_error(extractor: Any, seq: str, region: str, label: int, exc: Exception,
                     perturbation: Perturbation = perturbation, moved: dict = moved) -> Mapping[str, Any] | None:
            if perturbation.kind not in ("dilate", "erode"):
                file_log.warning("case %s, %s: %s / %s not extracted (%s)", case.case_id,
                                 perturbation.describe(), seq, region, exc)
                return None
            # a region the mask operation would destroy (a thin rim eroded away) keeps its contour
            file_log.info("case %s, %s: region %s kept as segmented (%s)", case.case_id,
                          perturbation.describe(), region, exc)
            return extractor.execute(moved[seq], mask, label=label)

        copies.append(extract_volumes(profile, moved, moved_mask, on_error))
    return copies


def _read(path: Path, inputs: dict[str, str], profile: Profile, version: str) -> Copies | None:
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry["inputs"] != inputs or entry["profile_sha256"] != profile.sha256 or entry["pyradiomics"] != version:
            return None
        copies = [{str(k): float(v) for k, v in c.items()} for c in entry["copies"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        file_log.warning("perturbed cache entry %s cannot be used (%s): extracting the case again", path, exc)
        return None
    assert profile.robustness is not None
    return copies if len(copies) == len(profile.robustness.draws()) else None


def perturbed_features(site: Site, profile: Profile, case_ids: Iterable[str]) -> dict[str, Copies]:
    """Every perturbed copy's features of the given cases, from the cache or extracted now (and cached)."""
    wanted, version = set(case_ids), pyradiomics_version()
    out: dict[str, Copies] = {}
    extracted, start = 0, time.perf_counter()
    with _log_to(site.files.extraction_log):
        for case in site.cases:
            if case.case_id not in wanted:
                continue
            inputs = _input_hashes(case, site.label_map)
            path = perturbed_cache_file(site, profile, case.case_id)
            copies = _read(path, inputs, profile, version)
            if copies is None:
                try:
                    copies = extract_perturbed(case, profile, inputs, site.label_map)
                except CaseInputError as exc:  # the originals were extracted, so this means the files changed
                    raise SiteError(f"case {case.case_id} cannot be perturbed: {exc.reason} ({exc.fix})") from None
                write_cache(path, {"case_id": case.case_id, "inputs": inputs, "profile_sha256": profile.sha256,
                                   "pyradiomics": version, "copies": copies})
                extracted += 1
            out[case.case_id] = copies
        if extracted:  # inside _log_to: the line goes to extraction.log
            file_log.info("site %s: %d case(s) extracted under %d perturbation(s) in %.1fs", site.name, extracted,
                          len(profile.robustness.draws()) if profile.robustness else 0, time.perf_counter() - start)
    return out


def robustness_reply(data: SiteData, agreed: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """The ICC sums (d,) of the agreed features over the training split (originals and perturbed copies, each
    centred on the site's own mean: common.icc), and ``unmeasured`` (d,): 1 where some copy of some training
    case has no finite value (the server treats the feature as not robust)."""
    rows = ~data.held_out
    ids = [c for c, r in zip(data.table.case_ids, rows, strict=True) if r]
    copies = perturbed_features(data.site, data.profile, ids)
    originals = data.table.columns(agreed)[rows]
    perturbed = np.array([[[c.get(name, math.nan) for name in agreed] for c in copies[case_id]] for case_id in ids],
                         dtype=np.float64).reshape(len(ids), -1, len(agreed))
    x = np.concatenate([originals[:, None, :], perturbed], axis=1)
    unmeasured = ~np.all(np.isfinite(x), axis=(0, 1))
    x[:, :, unmeasured] = 0.0  # no sum over a feature that could not be measured everywhere
    sums = icc.site_icc_sums(x)
    return {"ssb": sums.ssb, "ssw": sums.ssw, "unmeasured": unmeasured.astype(np.float64)}, sums.n

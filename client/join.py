"""`radfed site join`: harmonise a site that joins after a run, against the run's stored pooled ComBat
estimates (``harmonization.json`` in the run folder), so `radfed predict` can use that run's model here.

The pooled estimates (grand mean, pooled variance, covariate effects) stay as they are; the site fits only
its own location/scale effects, on all its usable cases, and keeps them in
``<output_dir>/harmonization/run-<id>.json``. Nothing leaves the site. The command line is in
``radfed.cli.site``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from client.site import SiteError


def join(pooled_file: Path, site_dir: Path, workers: int = 1) -> dict[str, Any]:
    """Fit this site's ComBat parameters against a run's pooled estimates; returns what was saved."""
    from client.extract import extract_site
    from client.steps import code_covariates, open_site
    from common import combat
    from common import covariates as cov

    try:
        stored = json.loads(pooled_file.read_text(encoding="utf-8"))
        names, n_sites = [str(n) for n in stored["features"]], int(stored["n_sites"])
        run_id, profile_sha256 = stored["run_id"], str(stored["profile_sha256"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise SiteError(f"{pooled_file} is not a run's harmonization.json ({exc!r}): use the file from the run "
                        "folder of a run made with harmonization = \"combat\"") from None
    options = {k.replace("-", "_"): bool(v) for k, v in stored.get("combat", {}).items()}
    site, profile = open_site(site_dir, "default")  # the site.yaml's profile, if it names one
    if profile.sha256 != profile_sha256:
        raise SiteError(f"site {site.name} extracts with profile {profile.name} ({profile.short_hash}), run "
                        f"{run_id} used {profile_sha256[:12]}: use the federation's profile at this site "
                        "(site.yaml 'profile') and extract again")
    path = site.files.harmonization(run_id)
    if path.exists():
        raise SiteError(f"{path} exists: this site already has parameters for run {run_id} (it took part, or "
                        "joined before); remove the file deliberately to refit")
    table, _ = extract_site(site, profile, workers=workers)  # cached; ComBat needs no diagnosis
    index = {n: i for i, n in enumerate(table.names)}
    missing = [n for n in names if n not in index]
    if missing:
        raise SiteError(f"site {site.name} lacks {len(missing)} of the run's features (e.g. {missing[0]}): "
                        "extract with the federation's profile")
    spec = cov.parse(str(stored.get("covariates") or ""))
    design = None
    if spec:  # code each case's covariates as the run did; a case without them is named and left out
        table, design = code_covariates(site, table, spec)
    x = table.values[:, [index[n] for n in names]]
    bad = ~np.all(np.isfinite(x), axis=0)
    if bad.any():
        raise SiteError(f"site {site.name}: {int(bad.sum())} of the run's features are not finite at every "
                        f"case (e.g. {names[int(np.argmax(bad))]}); fix or remove the cases named in "
                        f"{site.files.errors}")
    d = len(names)
    pooled = combat.PooledEstimates.for_joiner(n_sites, int(stored["n"]), stored["grand_mean"],
                                               stored["var_pooled"], stored["beta_cov"],
                                               np.asarray(stored["zero_variance"], dtype=np.float64))
    _, params = combat.join_site(x, pooled, design, **options)
    saved = {**params.to_dict(), "features": names, "run_id": run_id, "joined": True,
             "covariates": cov.describe(spec)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved), encoding="utf-8")
    left_out = [f"{p.case_id}: {p.reason}" for p in table.problems if p.kind == "bad-covariate"]
    return {"site": site.name, "run_id": run_id, "cases": int(len(x)), "features": d, "path": str(path),
            "left_out": left_out}

"""Report section "Feature robustness": the ICC distribution per sequence/region and the features that left
(metrics.json ``features.robustness``, from server.robustness)."""

from __future__ import annotations

from typing import Any

from server.report_blocks import Bullets, Section, Table, Text, as_dict, fmt


def robustness_section(doc: dict[str, Any]) -> Section:
    rob = as_dict(as_dict(doc.get("features")).get("robustness"))
    if not rob:
        threshold = as_dict(doc.get("config")).get("robustness-min-icc", 0)
        return Section("", "", [Text(f"Off (robustness-min-icc = {threshold}): every agreed feature went to "
                                     "selection without a robustness check.")])
    groups = as_dict(rob.get("groups"))
    rows = []
    for name, g in groups.items():
        g = as_dict(g)
        q = [fmt(v) if v == v else "n/a" for v in g.get("icc_quantiles", [])]  # v != v: NaN
        rows.append([name, str(g.get("n")), *q, str(g.get("removed")), str(g.get("not_measurable"))])
    removed = [str(n) for n in rob.get("removed", [])]
    m = int(rob.get("measurements", 1))
    blocks = [
        Text("Each site extracted its training cases again under the profile's perturbations "
             f"({m} measurements per case: the original and {m - 1} perturbed copies) and "
             f"sent ANOVA sums; the server pooled them into each feature's {rob.get('form')} over "
             f"{rob.get('n_cases')} training cases at {len(rob.get('sites', []))} sites. Features with ICC below "
             f"{rob.get('threshold')} (or not measurable under a perturbation) left before selection: "
             f"{rob.get('n_removed')} of {rob.get('n_features')}."),
        Table(["sequence/region", "features", "ICC min", "25%", "median", "75%", "max", "removed",
               "not measurable"], rows, code_first=True),
    ]
    if removed:
        blocks.append(Text(f"Features that left ({len(removed)}):", "em"))
        blocks.append(Bullets(removed[:60] + ([f"... and {len(removed) - 60} more (metrics.json)"]
                                              if len(removed) > 60 else [])))
    return Section("robustness", "Feature robustness (ICC under perturbations)", blocks)

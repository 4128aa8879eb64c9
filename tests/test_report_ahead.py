"""The report's figures drawn ahead, while the run's folds go on (``report.draw_ahead``): the outputs take a figure
drawn ahead only where the final document draws it from the same data, so report.html is the same, byte for byte,
as drawn at the end; a figure whose data changed after it was drawn ahead is drawn again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from report_helpers import SITES, make_result

from server import plots, report
from server.report_blocks import DRAWN, Figure, figure_key
from server.report_sections import SECTIONS, all_site_names


@pytest.fixture
def demo_root(tmp_path: Path) -> Path:
    root = tmp_path / "demo-data"
    root.mkdir()
    (root / report.DEMO_STAMP).write_text(json.dumps({"seed": 0, "sites": [{"name": n} for n in SITES]}))
    return root


def _figure_keys(doc: dict) -> list[bytes | None]:
    colours = plots.site_colours(all_site_names(doc))
    return [figure_key(b, colours) for _sid, _title, build in SECTIONS for b in build(doc).blocks
            if isinstance(b, Figure)]


def _outputs(tmp_path: Path, demo_root: Path, name: str, ahead_of_folds: bool, change: bool = False) -> bytes:
    """report.html of the same run, written at the end alone or with the figures drawn ahead from the results as
    they stand before the folds (no external validation yet; ``change``: one site's histogram of the first
    harmonised feature differs then from the final one)."""
    folder = tmp_path / name
    folder.mkdir()
    result = make_result(folder, demo_root)
    ahead = None
    if ahead_of_folds:
        final_validation, final_harmonization = result.validation, result.harmonization
        result.validation = {}
        if change:
            result.harmonization = json.loads(json.dumps(final_harmonization))
            first = next(iter(result.harmonization["features"].values()))
            counts = next(iter(first["sites"].values()))["before"]
            counts[0] += 1
        ahead = report.draw_ahead(result)
        ahead.join()
        drawn = set(ahead.drawn)
        result.validation, result.harmonization = final_validation, final_harmonization
        final = _figure_keys(result.as_json())
        taken = sum(key in drawn for key in final)
        # every figure but the external validation's ROC (and the changed histogram) is drawn ahead
        assert taken == len(final) - 1 - change and len(final) >= 6
    report.write_outputs(result, ahead)
    assert not DRAWN  # nothing kept beyond the run's outputs
    return (folder / "report.html").read_bytes()


def test_figures_drawn_ahead_give_the_same_report(tmp_path, demo_root):
    assert _outputs(tmp_path, demo_root, "ahead", True) == _outputs(tmp_path, demo_root, "end", False)


def test_a_figure_whose_data_changed_after_it_was_drawn_ahead_is_drawn_again(tmp_path, demo_root):
    assert _outputs(tmp_path, demo_root, "stale", True, change=True) == _outputs(tmp_path, demo_root, "end", False)

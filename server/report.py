"""The human report of a run: report.html and report.md, built from its metrics.json document alone.

Every section is built once, as data (``server.report_sections``: what each section says; blocks from
``server.report_blocks``), and rendered here to both formats. report.html is one self-contained file: its
figures are PNGs drawn by ``server.plots`` and embedded as base64 data URIs, its style is inline, and a
Content-Security-Policy forbids loading anything else. A section whose data is missing (older runs, refused or
failed runs) or cannot be built says "not available: <why>", so a report can always be written.

``write_outputs`` writes a run's outputs: metrics.json (``server.results``), then the two reports.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from typing import Any

from server import plots
from server.drawing import Ahead
from server.report_blocks import DRAWN, Section, esc, keyed_figures, short, to_html, to_markdown, unavailable
from server.report_sections import DEMO_STAMP, SECTIONS, all_site_names, final_table
from server.results import RunResult, write_metrics

__all__ = ["DEMO_STAMP", "RunResult", "final_table", "render_html", "render_markdown", "sections", "write_outputs"]

log = logging.getLogger("flwr.radfed.server")

FOOTER = "Research use only: not a diagnostic device."
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:62em;padding:0 1em;color:#222;
line-height:1.4}
table{border-collapse:collapse;margin:1em 0;font-size:.92em;display:block;max-width:100%;overflow-x:auto}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#f4f4f4}.facts th{overflow-wrap:normal}#headline td{font-size:1.05em}#headline th{width:11em}
img{max-width:100%;height:auto}figure{margin:1em 0}figcaption{font-size:.85em;color:#555;max-width:48em}
.na{color:#8a5300}.nw{white-space:nowrap}nav a{margin-right:.8em}section{border-top:1px solid #ddd;margin-top:1.5em}
code{font-size:.9em}details{margin:.5em 0}
@media (max-width:600px){body{margin:1em auto;padding:0 .5em}table{font-size:.8em}td,th{padding:.2em .3em}
.nw{white-space:normal}#headline th{width:auto}}"""


def write_outputs(result: RunResult, ahead: Ahead | None = None) -> None:
    """metrics.json, report.md and report.html in the run folder; ``ahead``: what ``draw_ahead`` started, whose
    figures drawn so far are taken (and the child stopped) before any figure is drawn here; they are used where the
    final document draws the same."""
    doc = write_metrics(result)
    try:
        secs = sections(doc)
        (result.folder / "report.md").write_text(render_markdown(doc, secs), encoding="utf-8")
        if ahead is not None:
            DRAWN.update(ahead.share(figures(secs, plots.site_colours(all_site_names(doc)))))
        (result.folder / "report.html").write_text(render_html(doc, secs), encoding="utf-8")
    finally:
        DRAWN.clear()


def figures(secs: list[Section], colours: dict[str, str]) -> list[tuple[bytes, Callable[[], bytes]]]:
    """The report's figures in order, each once: (its key, ``report_blocks.figure_key``; what draws it)."""
    out: dict[bytes, Callable[[], bytes]] = {}
    for sec in secs:
        for key, b in keyed_figures(sec.blocks, colours):
            out.setdefault(key, functools.partial(b.plot, *b.args, colours, **b.options))
    return list(out.items())


def draw_ahead(result: RunResult, ahead: Ahead | None = None) -> Ahead:
    """Start drawing the figures of the report the run's results so far would give (the outputs' largest cost: about
    1 s of matplotlib), in a child process at the lowest CPU priority (``server.drawing``; ``ahead``: the one
    ``drawing.Ahead`` started at the run's start, warmed up meanwhile, else a new one), while the coordinator waits
    for the sites' last rounds. Only a figure the final document draws from the same plot, data, colours and
    options (``figure_key``, byte for byte) is taken from these; every other one is drawn at the end as before, so
    the report is the same."""
    if ahead is None:
        ahead = Ahead()
        ahead.start()
    ahead.hand(copy.deepcopy(result.as_json()))  # the result goes on changing in the main thread
    return ahead


def _broken(sid: str, title: str, exc: Exception) -> Section:
    """A section that could not be built or drawn: a note saying what broke (a report must always be written)."""
    log.warning("report section %s could not be built: %s: %s", sid, type(exc).__name__, exc)
    return Section(sid, title, [unavailable(f"could not be built from this run's metrics ({type(exc).__name__}: "
                                            f"{short(exc, 160)})")])


def sections(doc: dict[str, Any]) -> list[Section]:
    """Every section in order; one that cannot be built says why instead of stopping the report."""
    out = []
    for sid, title, build in SECTIONS:
        try:
            sec = build(doc)
        except Exception as exc:  # a report must always be written: the section says what broke
            sec = _broken(sid, title, exc)
        sec.id, sec.title = sec.id or sid, sec.title or title
        out.append(sec)
    return out


def render_markdown(doc: dict[str, Any], secs: list[Section] | None = None) -> str:
    """report.md of the metrics document ``doc`` (``secs``: its sections, when already built)."""
    lines = ["# radfed run report", ""]
    for sec in sections(doc) if secs is None else secs:
        if sec.id == "summary":
            lines += [*to_markdown(sec.blocks), ""]
        else:
            lines += [f"## {sec.title}", "", *to_markdown(sec.blocks), ""]
    lines += [FOOTER, ""]
    return "\n".join(lines)


def render_html(doc: dict[str, Any], secs: list[Section] | None = None) -> str:
    """report.html of the metrics document ``doc`` (``secs``: its sections, when already built)."""
    secs = sections(doc) if secs is None else secs
    colours = plots.site_colours(all_site_names(doc))
    bodies = []
    for sec in secs:
        try:
            bodies.append(to_html(sec.blocks, colours))
        except Exception as exc:  # a figure that cannot be drawn: the section says what broke
            bodies.append(to_html(_broken(sec.id, sec.title, exc).blocks, colours))
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title.split(" (")[0])}</a>' for s in secs)
    shown = [f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>\n{html}</section>'
             for s, html in zip(secs, bodies, strict=True)]
    # the result comes first, before the table of contents: it is what a reader opened the report for
    first = shown.pop(0) if secs and secs[0].id == "headline" else ""
    body = "\n".join(shown)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>radfed run {esc(doc.get('run_id', ''))}</title>
<style>{STYLE}</style></head>
<body><h1>radfed run report</h1>
{first}
<nav>{nav}</nav>
{body}
<p><strong>{esc(FOOTER)}</strong></p></body></html>
"""

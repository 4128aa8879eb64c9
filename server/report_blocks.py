"""The building blocks of the human report, and how each one renders to HTML and to Markdown.

A report section is a title and a list of blocks (paragraphs, key-value facts, tables, lists, sub-headings,
figures), built once as data by ``server.report_sections``; ``server.report`` puts the rendered sections into
report.html and report.md. A figure is a deferred plot call: only the HTML page draws it (as an embedded PNG),
Markdown names it in a line of text, so writing report.md never runs matplotlib.
"""

from __future__ import annotations

import html
import io
import math
import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from server import plots


def as_dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a dict, else {}: a metrics.json from an older or failed run may lack any part."""
    return value if isinstance(value, dict) else {}


def finite_number(value: Any) -> float | None:
    """``value`` as a float if it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)

SHOWN = ("auc", "sensitivity", "specificity", "balanced_accuracy")
SHOWN_LABELS = ("AUC", "sensitivity", "specificity", "balanced acc.")
NOWRAP_CHARS = 24  # "0.812 (0.70–0.90)" and other short cells stay on one line


@dataclass
class Block:
    """What every block has: ``only`` = "html" or "md" keeps it to one format; ``tight``: in Markdown, no blank
    line before it (it continues the block above)."""

    only: str = field(default="", kw_only=True)
    tight: bool = field(default=False, kw_only=True)


@dataclass
class Text(Block):
    """A paragraph. ``style``: "na" (a missing part), "em" (emphasised), "item" (a paragraph in HTML, a list
    item in Markdown), or "" (plain)."""

    text: str
    style: str = ""


@dataclass
class Facts(Block):
    """Key-value pairs: a two-column table in HTML, a list with bold keys in Markdown."""

    pairs: list[tuple[str, str]]


@dataclass
class Table(Block):
    """A table; ``code_first`` sets the first column as code; ``fold``: in HTML, folded under this summary."""

    header: list[str]
    rows: list[list[str]]
    code_first: bool = False
    fold: str = ""


@dataclass
class Bullets(Block):
    items: list[str]


@dataclass
class Heading(Block):
    """A sub-heading within a section."""

    text: str


@dataclass
class Figure(Block):
    """``plot(*args, colours, **options)`` -> PNG, drawn for the HTML page only; ``md``: the Markdown line that
    stands for it (raw Markdown; none if empty). With ``fallback`` set, a ValueError while drawing renders as
    "not available for <fallback>: <why>" instead of failing the whole section."""

    plot: Callable[..., bytes]
    args: tuple[Any, ...]
    alt: str
    caption: str
    md: str = ""
    fallback: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Section:
    """One report section: an anchor id, a title and its blocks."""

    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)


def unavailable(why: str) -> Text:
    return Text(f"not available: {why}", "na")


# ---------------------------------------------------------------------------------------------- HTML


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def html_table(header: list[str], rows: list[list[str]], code_first: bool = False) -> str:
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(
        f"<td><code>{esc(c)}</code></td>" if code_first and i == 0
        else f'<td class="nw">{esc(c)}</td>' if len(c) <= NOWRAP_CHARS else f"<td>{esc(c)}</td>"
        for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def to_html(blocks: list[Block], colours: dict[str, str]) -> str:
    """The blocks as HTML, figures drawn with the site ``colours``; a drawing error other than a Figure's
    fallback propagates (the caller turns the section into a note)."""
    return "".join(_html(b, colours) for b in blocks if b.only != "md")


# PNGs drawn ahead of the outputs (``report.draw_ahead``: while the run's last rounds go on), by what drew them
DRAWN: dict[bytes, bytes] = {}


def figure_key(b: Figure, colours: dict[str, str]) -> bytes | None:
    """What a figure is drawn from (its plot, data, colours and options), as bytes: a figure drawn ahead is used only
    for a figure whose key is the same, byte for byte, so it is the same picture; None when it cannot be pickled."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=5)
    pickler.fast = True  # no memo: equal data gives equal bytes whichever objects it shares
    try:
        pickler.dump((b.plot.__module__, b.plot.__qualname__, b.args, colours, b.options))
    except Exception:  # noqa: BLE001  # such a figure is just drawn when the report is written
        return None
    return buf.getvalue()


def keyed_figures(blocks: Iterable[Block], colours: dict[str, str]) -> Iterator[tuple[bytes, Figure]]:
    """Each figure of ``blocks`` the HTML report shows, with its key (``figure_key``; one without a key is drawn
    when the report is written)."""
    for b in blocks:
        key = figure_key(b, colours) if isinstance(b, Figure) and b.only != "md" else None
        if key is not None:
            yield key, b


def draw(b: Figure, colours: dict[str, str]) -> bytes:
    """The figure's PNG: the one drawn ahead from the same key, else drawn now."""
    key = figure_key(b, colours) if DRAWN else None  # nothing drawn ahead (no folds): no key to compute
    png = DRAWN.get(key) if key is not None else None
    return png if png is not None else b.plot(*b.args, colours, **b.options)


def _html(b: Block, colours: dict[str, str]) -> str:
    if isinstance(b, Text):
        if b.style == "na":
            return f'<p class="na">{esc(b.text)}</p>'
        return f"<p><em>{esc(b.text)}</em></p>" if b.style == "em" else f"<p>{esc(b.text)}</p>"
    if isinstance(b, Facts):
        return ('<table class="facts">' + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in b.pairs)
                + "</table>")
    if isinstance(b, Table):
        table = html_table(b.header, b.rows, b.code_first)
        return f"<details><summary>{esc(b.fold)}</summary>{table}</details>" if b.fold else table
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{esc(x)}</li>" for x in b.items) + "</ul>"
    if isinstance(b, Heading):
        return f"<h3>{esc(b.text)}</h3>"
    if isinstance(b, Figure):
        try:
            png = draw(b, colours)
        except ValueError as exc:
            if not b.fallback:
                raise
            return f'<p class="na">not available for {esc(b.fallback)}: {esc(exc)}</p>'
        return (f'<figure><img src="{plots.data_uri(png)}" alt="{esc(b.alt)}">'
                f"<figcaption>{esc(b.caption)}</figcaption></figure>")
    raise TypeError(f"not a report block: {b!r}")


# ---------------------------------------------------------------------------------------------- Markdown


def md(value: Any) -> str:
    """Text for a Markdown table cell or line: no raw HTML, no table breaks."""
    s = " ".join(str(value).split())
    return s.replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def md_code(value: Any) -> str:
    s = " ".join(str(value).split()).replace("|", "\\|")
    return f"`` {s} ``" if "`" in s else f"`{s}`"


def md_table(header: list[str], rows: list[list[str]], code_first: bool = False) -> list[str]:
    out = ["| " + " | ".join(md(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(md_code(c) if code_first and i == 0 else md(c) for i, c in enumerate(r)) + " |"
            for r in rows]
    return out


def to_markdown(blocks: list[Block]) -> list[str]:
    """The blocks as Markdown lines, a blank line between blocks (none before a ``tight`` one)."""
    out: list[str] = []
    for b in blocks:
        lines = [] if b.only == "html" else _md_lines(b)
        if lines and out and not b.tight:
            out.append("")
        out += lines
    return out


def _md_lines(b: Block) -> list[str]:
    if isinstance(b, Text):
        if b.style in ("na", "em"):
            return [f"_{md(b.text)}_"]
        return [f"- {md(b.text)}"] if b.style == "item" else [md(b.text)]
    if isinstance(b, Facts):
        return [f"- **{md(k)}**: {md(v)}" for k, v in b.pairs]
    if isinstance(b, Table):
        return md_table(b.header, b.rows, b.code_first)
    if isinstance(b, Bullets):
        return [f"- {md(x)}" for x in b.items]
    if isinstance(b, Heading):
        return [f"### {md(b.text)}"]
    if isinstance(b, Figure):
        return [b.md] if b.md else []
    raise TypeError(f"not a report block: {b!r}")


# ---------------------------------------------------------------------------------------------- reading a run


def final_of(doc: dict[str, Any]) -> dict[str, Any]:
    return as_dict(doc.get("final"))


def final_sites(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(k): as_dict(v) for k, v in as_dict(final_of(doc).get("sites")).items()}


def rounds_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in doc.get("rounds") or [] if isinstance(r, dict)]


def short(text: Any, limit: int = 240) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def why_no_rounds(doc: dict[str, Any]) -> str:
    status, error = doc.get("status"), doc.get("error")
    because = f": {short(error)}" if error else ""
    if status == "refused":
        return f"the run was refused before training{because}"
    if status == "failed":
        return f"the run failed before a round was evaluated{because}"
    if status == "running":
        return "the run did not finish"
    return "this run recorded no evaluation round"


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def not_available(why: str) -> Section:
    """A section that cannot be shown: it says why (the caller's id and title are filled in)."""
    return Section("", "", [unavailable(why)])


# ---------------------------------------------------------------------------------------------- metrics with intervals


def interval_text(ci: Any) -> str | None:
    """ "0.70–0.90" from [lo, hi]; None when there is no usable interval."""
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        return None
    lo, hi = finite_number(ci[0]), finite_number(ci[1])
    if lo is None or hi is None:
        return None
    return f"{lo:.2f}–{hi:.2f}"


def fmt_ci(value: Any, ci: Any) -> str:
    """ "0.812 (0.70–0.90)"; just the value when there is no interval."""
    text = fmt(value)
    interval = interval_text(ci)
    return f"{text} ({interval})" if interval and value is not None else text


def has_ci(records: list[dict[str, Any]]) -> bool:
    return any(interval_text(as_dict(r.get("ci")).get(k)) for r in records for k in SHOWN)


def metric_cells(record: dict[str, Any], with_ci: bool) -> list[str]:
    ci = as_dict(record.get("ci"))
    return [fmt_ci(record.get(k), ci.get(k)) if with_ci else fmt(record.get(k)) for k in SHOWN]


def metric_header(with_ci: bool) -> list[str]:
    return [f"{h} (95% CI)" for h in SHOWN_LABELS] if with_ci else list(SHOWN_LABELS)

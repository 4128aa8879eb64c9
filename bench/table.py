"""The one way benchmarks print their result: a Markdown table, of (measure, value) rows or of named columns."""

from __future__ import annotations


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    print_columns(title, ["measure", "value"], [list(r) for r in rows])


def print_columns(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    print(f"\n{title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")

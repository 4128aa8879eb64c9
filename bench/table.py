"""The one way benchmarks print their result: a Markdown table of (measure, value) rows."""

from __future__ import annotations


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len("measure"), *(len(k) for k, _ in rows))
    print(f"\n{title}\n")
    print(f"| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")

"""Markdown tables of result rows (benchmarks, sweep summaries)."""

from __future__ import annotations


def format_cell(value) -> str:
    """Floats with 4 significant digits, ``None`` as an empty cell, anything else as text."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table whose columns are the union of the rows' keys, in first-seen order.

    >>> print(markdown_table([{"a": 1, "b": 0.123456}, {"a": 2, "c": None}]))
    | a | b | c |
    |---|---|---|
    | 1 | 0.1235 |  |
    | 2 |  |  |
    """
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(format_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)

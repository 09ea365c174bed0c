"""Plain-text tables of evaluation rows."""

from __future__ import annotations

from typing import Any


def format_rows(rows: list[dict[str, Any]], metrics: tuple[str, ...] | None = None) -> str:
    """A fixed-width table: method, the index it scored (FAISS's factory words), nprobe, the
    metric columns, the search cost (mean codes scanned per query, list imbalance, the largest
    list and the std of list sizes), build and
    eval seconds."""
    if not rows:
        return "(no rows)"
    metric_cols = list(metrics or [k for k in rows[0] if "@" in k])
    costs = ("codes_scanned", "imbalance", "largest_list", "list_size_std")
    cost_cols = [c for c in costs if c in rows[0]]
    index_col = ["index"] * any("index" in r for r in rows)
    cols = ["method", *index_col, "nprobe", *metric_cols, *cost_cols, "build_s", "eval_s"]
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)

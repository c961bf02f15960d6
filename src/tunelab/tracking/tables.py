"""Numbers and tables as text: the cells every terminal table and HTML page shows, in one place.

`fmt_value` is also the templates' `fmt` filter; the fixed-width tables are the CLI's.
"""

from __future__ import annotations

import json
import math
from typing import Any

_LOWER_IS_BETTER = ("loss", "perplexity")


def fmt_value(v: Any) -> str:
    """Numbers to 4 significant digits (big ones as grouped integers); None as "n/a"."""
    if v is None:
        return "n/a"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return v if isinstance(v, str) else json.dumps(v)
    if isinstance(v, int):
        return f"{v:,}"
    if math.isfinite(v) and abs(v) >= 1e4:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def lower_is_better(metric: str) -> bool:
    """Loss and perplexity (and their variants) fall as a model improves; task metrics rise."""
    return any(k in metric for k in _LOWER_IS_BETTER)


def text_table(rows: list[tuple[str, ...]], labels: int = 1) -> str:
    """Fixed-width terminal table; rows[0] is the header, the first `labels` columns are
    left-aligned text and the rest right-aligned numbers."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        " | ".join(c.ljust(w) if i < labels else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)

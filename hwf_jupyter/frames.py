"""``ResultFrame``: the DataFrame HWF returns, with a display made for ids.

Task ids are 18 characters (``t-`` + 16 hex) and eat the width pandas has,
so it elides the columns people came for; browsers also break them (and
machine names) at the hyphen.  A ``ResultFrame`` is a plain DataFrame in
every way that computes (same data, same dtypes, same methods); only its
display differs:

* id columns (``task_id``, ``session_id``, ``machine_id``) show the first 8
  hex characters and an ellipsis, ``t-1a2b3c4d…``; the column still holds the
  full id (``df["task_id"]``, ``df.to_csv()``);
* the HTML table never wraps a cell (``white-space: nowrap``): pandas already
  cuts long text to ``display.max_colwidth`` characters.

It also builds the frames: fixed columns and dtypes (even with no rows) and
one missing-value marker, pandas' ``<NA>`` (nullable ``Int64``, ``Float64``,
``string``, ``boolean`` dtypes; times are UTC Timestamps, missing ``NaT``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

ID_COLUMNS = ("task_id", "session_id", "machine_id")
SHORT_HEX = 8  # hex characters shown after the prefix: 4e9 ids before a likely clash

# The CSS class is fixed (not per table): every ResultFrame styles the same.
_STYLE = ("<style>.hwf-frame td, .hwf-frame th {white-space: nowrap;}</style>")


def short_id(value: Any) -> Any:
    """``t-1a2b3c4d5e6f7a8b`` -> ``t-1a2b3c4d…``; anything else is returned unchanged."""
    if not isinstance(value, str):
        return value
    prefix, sep, rest = value.partition("-")
    if not sep or len(rest) <= SHORT_HEX + 1:
        return value
    return f"{prefix}-{rest[:SHORT_HEX]}…"


class ResultFrame(pd.DataFrame):
    """A DataFrame that displays ids short and does not wrap them (see module doc)."""

    @property
    def _constructor(self):  # pandas builds results of operations with this
        return ResultFrame

    def _display_copy(self) -> pd.DataFrame:
        plain = pd.DataFrame(self)
        ids = [c for c in ID_COLUMNS if c in plain.columns]
        if not ids:
            return plain
        plain = plain.copy(deep=False)
        for c in ids:
            col = plain[c]
            if isinstance(col, pd.DataFrame):  # a duplicated column name: leave it alone
                continue
            plain[c] = col.map(short_id, na_action="ignore").astype(col.dtype)
        return plain

    def __repr__(self) -> str:
        return repr(self._display_copy())

    def _repr_html_(self) -> str | None:
        inner = self._display_copy()._repr_html_()
        if inner is None:
            return None
        return f'<div class="hwf-frame">{_STYLE}{inner}</div>'


def build_frame(rows: Sequence[dict[str, Any]], columns: dict[str, Any]) -> ResultFrame:
    """Rows -> ResultFrame with fixed columns and dtypes, even when there are no rows.

    A dtype of ``"time"`` takes epoch seconds and gives UTC Timestamps (us).
    """
    data = {}
    for name, dtype in columns.items():
        values = [row[name] for row in rows]
        if isinstance(dtype, str) and dtype == "time":
            seconds = pd.Series(values, dtype="Float64").astype("float64")  # NA -> NaN -> NaT
            # Fixed unit: pandas would otherwise pick one per column from the values.
            data[name] = pd.to_datetime(seconds, unit="s", utc=True).dt.as_unit("us")
        else:
            data[name] = pd.Series(values, dtype=dtype)
    return ResultFrame(data, columns=list(columns))


def stage_order(sequences: Iterable[Sequence[str]]) -> list[str]:
    """One order for stage names that keeps every task's own order.

    Tasks may have different stages (``prepare, train`` and ``prepare, eval,
    train``): a stable topological sort of "comes right after" edges, ties
    broken by first appearance; names in a cycle (two tasks that disagree)
    keep their first-appearance order.
    """
    first: dict[str, int] = {}
    after: dict[str, set[str]] = {}
    for seq in sequences:
        prev = None
        for name in seq:
            first.setdefault(name, len(first))
            after.setdefault(name, set())
            if prev is not None and prev != name:
                after[prev].add(name)
            prev = name
    indegree = {n: 0 for n in first}
    for n, nexts in after.items():
        for m in nexts:
            indegree[m] += 1
    order: list[str] = []
    placed: set[str] = set()
    while len(order) < len(first):
        ready = [n for n in first if n not in placed and indegree[n] == 0]
        if not ready:  # a cycle: take the earliest remaining name
            ready = [n for n in first if n not in placed]
        n = min(ready, key=first.__getitem__)
        order.append(n)
        placed.add(n)
        for m in after[n]:
            indegree[m] -= 1
    return order

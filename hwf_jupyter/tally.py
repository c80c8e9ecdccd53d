"""Credit tallies and slots as pandas DataFrames (pure shaping, no I/O)."""

from __future__ import annotations

from typing import Any, Iterable

import pandas as pd

from hub_server import protocol as p

# Counters the hub adds to every task it credits; shown first, then any others.
STANDARD_COUNTERS = ("tasks", "cpu_seconds", "wall_seconds", "gpu_seconds")
SLOT_COLUMNS = ("slot", "state", "credits", "min", "max", "machine", "owner", "user", "session_id",
                "task_id", "reason", "allocated", "expires", "ended")


def tally_frame(by: str, rows: Iterable[p.CreditTallyRow]) -> pd.DataFrame:
    """One row per ``by`` key: credits, the standard counters, any other counters,
    pending (not yet paid to an owner), slots, rank (1 = most credits)."""
    rows = list(rows)
    extra = sorted({k for r in rows for k in r.counters} - set(STANDARD_COUNTERS))
    records = []
    for r in rows:
        rec: dict[str, Any] = {by: r.key, "credits": r.credits}
        for name in (*STANDARD_COUNTERS, *extra):
            rec[name] = r.counters.get(name, 0)
        rec["tasks"] = int(rec["tasks"])
        rec["pending"] = r.pending
        rec["slots"] = r.slots
        records.append(rec)
    columns = [by, "credits", *STANDARD_COUNTERS, *extra, "pending", "slots"]
    df = pd.DataFrame.from_records(records, columns=columns)
    df = df.sort_values(["credits", by], ascending=[False, True], na_position="last", kind="stable")
    df.insert(0, "rank", range(1, len(df) + 1))
    return df.reset_index(drop=True)


def slots_frame(slots: Iterable[p.CreditSlotInfo]) -> pd.DataFrame:
    """One row per slot; counters and meta as dict columns."""
    records = []
    for s in slots:
        rec = {c: getattr(s, c) for c in SLOT_COLUMNS}
        rec["counters"] = dict(s.counters)
        rec["meta"] = dict(s.meta)
        records.append(rec)
    df = pd.DataFrame.from_records(records, columns=[*SLOT_COLUMNS, "counters", "meta"])
    for col in ("allocated", "expires", "ended"):
        df[col] = pd.to_datetime(df[col], unit="s")
    return df

"""Ledger reconciliation: did every frame a producer sent reach the store exactly once, and is it readable?"""
from __future__ import annotations

from moescope.collector.store import Store


def check_run(store: Store, run: str) -> tuple[str, int]:
    """Per-producer table of sent / stored / dead-lettered / conflicts / dropped / missing, and an exit code.

    Every live segment of the run is read back (its Parquet footer); unreadable ones are
    quarantined and listed. Exit code 1 when any frame is unaccounted for (missing),
    dropped past the spill budget, refused as a (producer, seq) conflict, or stored in a
    segment that can no longer be read; 0 when the store holds every frame that was sent.
    """
    ledger = store.ledger(run)
    if ledger.empty:
        return f"run {run}: no frames recorded", 1
    store.verify_segments(run)
    quarantined = store.quarantined(run)
    lines = [f"run {run}"]
    header = f"{'producer':<40} {'sent':>8} {'stored':>8} {'dead':>6} {'conflict':>8} {'dropped':>8} {'missing':>8}  closed"
    lines.append(header)
    for row in ledger.itertuples(index=False):
        lines.append(f"{row.producer:<40} {row.sent:>8} {row.stored:>8} {row.dead_lettered:>6} {row.conflicts:>8} "
                     f"{row.dropped:>8} {row.missing:>8}  {'yes' if row.closed else 'no'}")
        if row.missing:
            lines.append(f"  missing seqs (first 20): {row.missing_seqs}")
    for q in quarantined.itertuples(index=False):
        lines.append(f"  quarantined {q.table_name} segment {q.path} ({q.rows} rows): {q.reason}")
    missing, dropped = int(ledger.missing.sum()), int(ledger.dropped.sum())
    conflicts, lost_rows = int(ledger.conflicts.sum()), int(quarantined.rows.sum()) if not quarantined.empty else 0
    ok = missing == 0 and dropped == 0 and conflicts == 0 and quarantined.empty
    if ok:
        lines.append("OK: every sent frame is stored, dead-lettered with a reason, or accounted for")
    else:
        lines.append(f"GAP: {missing} frame(s) missing, {dropped} dropped past the spill budget, {conflicts} refused as "
                     f"(producer, seq) conflicts, {len(quarantined)} unreadable segment(s) quarantined ({lost_rows} rows)")
    return "\n".join(lines), 0 if ok else 1

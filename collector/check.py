"""Ledger reconciliation: did every frame a producer sent reach the store exactly once?"""
from __future__ import annotations

from moescope.collector.store import Store


def check_run(store: Store, run: str) -> tuple[str, int]:
    """Per-producer table of sent / stored / dead-lettered / dropped / missing, and an exit code.

    Exit code 1 when any frame is unaccounted for (missing) or any was dropped past the
    spill budget; 0 when the store holds every frame that was sent.
    """
    ledger = store.ledger(run)
    if ledger.empty:
        return f"run {run}: no frames recorded", 1
    lines = [f"run {run}"]
    header = f"{'producer':<40} {'sent':>8} {'stored':>8} {'dead':>6} {'dropped':>8} {'missing':>8}  closed"
    lines.append(header)
    for row in ledger.itertuples(index=False):
        lines.append(f"{row.producer:<40} {row.sent:>8} {row.stored:>8} {row.dead_lettered:>6} {row.dropped:>8} {row.missing:>8}  "
                     f"{'yes' if row.closed else 'no'}")
        if row.missing:
            lines.append(f"  missing seqs (first 20): {row.missing_seqs}")
    missing, dropped = int(ledger.missing.sum()), int(ledger.dropped.sum())
    ok = missing == 0 and dropped == 0
    lines.append("OK: every sent frame is stored, dead-lettered with a reason, or accounted for" if ok
                 else f"GAP: {missing} frame(s) missing, {dropped} dropped past the spill budget")
    return "\n".join(lines), 0 if ok else 1

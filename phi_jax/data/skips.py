"""The bad-input report: records a reader skipped, counted by reason, with the first few positions.

A tasks module's source fills one per input file as it reads (file:line, file:row, file:record);
`prepare` keeps it in that shard's stats file ("skipped") and prints it, also on a resumed run that
redoes nothing: bad input is never silent and never forgotten.
"""

import collections

MAX_POSITIONS = 5  # positions kept per report


class SkipReport:
    """Counts of skipped records by reason, with the first MAX_POSITIONS positions."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.positions: list[str] = []

    def skip(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.positions) < MAX_POSITIONS:
            self.positions.append(f"{where} ({reason})")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: "SkipReport") -> "SkipReport":
        self.counts.update(other.counts)
        self.positions.extend(other.positions[: max(0, MAX_POSITIONS - len(self.positions))])
        return self

    def to_json(self) -> dict:
        return {"counts": dict(self.counts), "positions": list(self.positions)}

    @classmethod
    def from_json(cls, obj) -> "SkipReport":
        report = cls()
        report.counts.update(obj.get("counts", {}))
        report.positions = list(obj.get("positions", []))
        return report

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        return f"skipped {self.total} records ({reasons}); first: {'; '.join(self.positions)}"

"""What to do with a row that cannot be used (`data.on_bad_row`): stop at the first, or skip and count.

Skipping is the choice of a user with millions of rows and a few broken ones; the count per kind and the
first locations are logged once, so a skip is never silent."""

from __future__ import annotations

from collections import Counter

from sft_dist.errors import BadRow

SHOWN = 3  # locations listed in the summary


class BadRows:
    """Collects the bad rows of one split. `add` raises unless `skip`."""

    def __init__(self, *, skip: bool):
        self.skip = skip
        self.kinds: Counter[str] = Counter()
        self.first: list[str] = []

    def add(self, error: BadRow, where: str) -> None:
        if not self.skip:
            raise self.stop(error)
        self.kinds[error.kind] += 1
        if len(self.first) < SHOWN:
            self.first.append(where)

    @staticmethod
    def stop(error: BadRow) -> BadRow:
        return BadRow(f"{error}\n(to skip such rows instead, and count them, set data.on_bad_row=skip)", error.kind)

    @property
    def count(self) -> int:
        return sum(self.kinds.values())

    def summary(self, name: str) -> str:
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.kinds.most_common())
        more = ", ..." if self.count > len(self.first) else ""
        where = ", ".join(self.first) + more
        return f"data {name}: skipped {self.count} bad row(s) (data.on_bad_row=skip): {kinds}; at {where}"

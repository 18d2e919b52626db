"""Communication meter the harness hands to every backend.

Backends report what crossed a party boundary (bytes, rounds); the harness owns the
meter, splits it into phases (setup / fit / online) and turns it into result rows.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class PartyTraffic:
    bytes_sent: int = 0
    bytes_received: int = 0
    rounds: int = 0
    messages: int = 0


class CommMeter:
    """Thread-safe counters keyed by (phase, party)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.phase = "setup"
        self._counts: dict[tuple[str, str], PartyTraffic] = defaultdict(PartyTraffic)
        self.extra: dict[str, float] = {}

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def record(self, party: str, *, sent: int = 0, received: int = 0, rounds: int = 0,
               messages: int = 0, phase: str | None = None) -> None:
        """Add traffic seen by `party` (a role name such as 'data_owner')."""
        if min(sent, received, rounds, messages) < 0:
            raise ValueError("traffic counts cannot be negative")
        with self._lock:
            t = self._counts[(phase or self.phase, party)]
            t.bytes_sent += int(sent)
            t.bytes_received += int(received)
            t.rounds += int(rounds)
            t.messages += int(messages)

    def snapshot(self) -> dict[tuple[str, str], PartyTraffic]:
        with self._lock:
            return {k: PartyTraffic(**vars(v)) for k, v in self._counts.items()}

    def totals(self, phase: str | None = None) -> PartyTraffic:
        """Sum over parties. Bytes are counted once (sent side); rounds are the max over parties."""
        out = PartyTraffic()
        for (ph, _), t in self.snapshot().items():
            if phase is not None and ph != phase:
                continue
            out.bytes_sent += t.bytes_sent
            out.bytes_received += t.bytes_received
            out.messages += t.messages
            out.rounds = max(out.rounds, t.rounds)
        return out

    def parties(self) -> list[str]:
        return sorted({p for _, p in self.snapshot()})

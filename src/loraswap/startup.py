"""Where a replica's start went: the phases the ready banner names, so a slow start says which
part was slow (BentoML's serve process, the worker's import, vLLM's import, the engine)."""

from __future__ import annotations

import time

import psutil

# The parent of BentoML's worker is the process `bentoml serve` runs as (its arbiter).
SERVE_PROCESS_NAMES = ("circusd", "bentoml")


class StartPhases:
    """Named phases, each from the end of the one before; the first from the process's start
    (and from the `bentoml serve` process's start when that is this worker's parent)."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []
        self._last: float | None = None

    def begin(self) -> None:
        """The hook starts: what came before it becomes the first phases."""
        now_wall, self._last = time.time(), time.monotonic()
        self.phases.clear()
        me = psutil.Process()
        started = me.create_time()
        parent = me.parent()
        if parent is not None and parent.name() in SERVE_PROCESS_NAMES:  # its arbiter: "circusd"
            self.phases.append(("bentoml serve until the worker", started - parent.create_time()))
        self.phases.append(("worker import and set-up", now_wall - started))

    def mark(self, name: str) -> None:
        """``name`` ends now."""
        now = time.monotonic()
        if self._last is not None:
            self.phases.append((name, now - self._last))
        self._last = now

    def total(self) -> float:
        return sum(seconds for _, seconds in self.phases)

    def describe(self) -> str:
        return "; ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases)

"""Progress reporting without printing: library code calls a sink, the CLI renders it."""

from __future__ import annotations


class ProgressSink:
    """Receives ``start(stage, total)``, ``advance(stage, n)`` and ``finish(stage)``; ignores them."""

    def start(self, stage: str, total: int | None, unit: str = "tensors") -> None:
        pass

    def advance(self, stage: str, n: int = 1) -> None:
        pass

    def finish(self, stage: str) -> None:
        pass


NO_PROGRESS = ProgressSink()

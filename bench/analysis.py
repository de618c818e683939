"""What limits each figure: prose per workload, with this run's numbers filled in."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.report import RunResult


def analyse(run: RunResult) -> list[str]:
    return ["## What limits each figure", "", "(analysis pending)"]

"""The sidecar process collects cyclic garbage less often than Python's default.

Python's first threshold (700 net container allocations) ran a young
collection every few new connections, each walking the state of every
connection in flight. `meshid sidecar run` raises it (sidecar/cli.py);
in-process tests keep the interpreter's settings, so this checks the
setting itself and puts the old one back.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from sidecar.cli import GC_YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def restored() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_a_sidecar_collects_young_garbage_less_often(restored: None) -> None:
    gc.set_threshold(700, 10, 10)
    tune_gc()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)
    assert GC_YOUNG_THRESHOLD > 700


def test_older_generations_keep_their_thresholds(restored: None) -> None:
    gc.set_threshold(700, 7, 3)
    tune_gc()
    assert gc.get_threshold()[1:] == (7, 3)

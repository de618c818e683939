"""The serving process's garbage-collector settings (`ca.workers.tune_gc`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from ca.workers import GC_YOUNG, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_what_the_server_made_at_start_is_out_of_the_collectors_sight(restored_gc: None) -> None:
    made_at_start = [{"i": i} for i in range(1000)]
    tune_gc()
    assert gc.get_freeze_count() >= len(made_at_start)
    assert gc.get_threshold()[0] == GC_YOUNG
    # the older generations keep their rules: a cycle made later is still collected
    assert gc.get_threshold()[1:] == (10, 10)
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1

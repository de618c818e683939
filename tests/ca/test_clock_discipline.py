"""The authority reads no clock of its own: the composition root builds one and passes it down.

A guard over the source: a call to a clock function anywhere in ca/, or a
`system_clock()` outside the command-line composition root, fails here, so
time-dependent logic stays drivable by a ManualClock.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ca

CA_DIR = Path(ca.__file__).parent
CLOCK_READS = {
    ("datetime", "now"),
    ("datetime", "utcnow"),
    ("datetime", "today"),
    ("date", "today"),
    ("time", "time"),
    ("time", "time_ns"),
    ("time", "monotonic"),
    ("time", "monotonic_ns"),
    ("time", "perf_counter"),
    ("time", "perf_counter_ns"),
}
CLOCK_NAMES = {name for _, name in CLOCK_READS}
COMPOSITION_ROOTS = {"cli.py", "cliopts.py"}  # where a command builds its process's clock


def clock_reads(source: str, *, root: bool) -> list[str]:
    """Where `source` reads a clock itself: `time.monotonic` and the like (called or
    passed on), `from time import monotonic`, and, outside a composition root,
    `system_clock()`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ("time", "datetime"):
            found += [
                f"line {node.lineno}: from {node.module} import {a.name}"
                for a in node.names
                if a.name in CLOCK_NAMES
            ]
        if (  # a call, or a reference handed on (`time.monotonic` as a callable)
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and (node.value.id, node.attr) in CLOCK_READS
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "system_clock"
            and not root
        ):
            found.append(f"line {node.lineno}: system_clock()")
    return found


def test_the_guard_catches_each_kind_of_clock_read() -> None:
    source = (
        "import time\nfrom time import monotonic\nfrom datetime import datetime\n"
        "a = time.time()\nb = datetime.now()\nc = system_clock()\nd = f(time.perf_counter)\n"
    )
    assert len(clock_reads(source, root=False)) == 5
    assert len(clock_reads(source, root=True)) == 4
    assert clock_reads("t = self.clock.wall()\nm = self._clock.monotonic()\n", root=False) == []


def test_no_module_of_the_authority_reads_a_clock_itself() -> None:
    offenders = {
        path.name: reads
        for path in sorted(CA_DIR.glob("*.py"))
        if (reads := clock_reads(path.read_text(), root=path.name in COMPOSITION_ROOTS))
    }
    assert offenders == {}

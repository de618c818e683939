"""bench.scale: its section lands before the fan-out's, replaces itself, and keeps the rest."""

from __future__ import annotations

from bench.fanout import MARKER as FANOUT
from bench.scale import MARKER, insert, section

HEAD = "# meshid sidecar benchmark\n\nheadline\n"
FAN = f"{FANOUT}\n## Control-plane fan-out\n\ntable\n"


def one(printed: str) -> str:
    return section([("Idle sidecar memory", "bench.idle_rss", "RSS", printed)])


def test_the_section_names_the_command_and_holds_what_it_printed() -> None:
    text = one("static: idle RSS 45.9 MiB\n")
    assert text.startswith(MARKER)
    assert "`python -m bench.idle_rss` (RSS):" in text
    assert "```text\nstatic: idle RSS 45.9 MiB\n```" in text


def test_it_is_appended_to_a_file_without_a_fan_out_section() -> None:
    out = insert(HEAD, one("a\n"))
    assert out.startswith(HEAD.rstrip("\n")) and out.count(MARKER) == 1
    assert out.rstrip("\n").endswith("```")


def test_it_goes_before_the_fan_out_section_and_replaces_itself() -> None:
    first = insert(HEAD + "\n" + FAN, one("a\n"))
    assert first.index(MARKER) < first.index(FANOUT)
    second = insert(first, one("b\n"))
    assert second.count(MARKER) == 1 and second.count(FANOUT) == 1
    assert "```text\nb\n```" in second and "```text\na\n```" not in second
    assert second.endswith(FAN) and second.startswith(HEAD.rstrip("\n"))
    assert insert(second, one("b\n")) == second


def test_paths_of_this_machine_do_not_reach_the_results() -> None:
    from pathlib import Path

    from bench.scale import portable

    printed = (
        "static: idle RSS 44.9 MiB: /src/m/.venv/bin/meshid run --config /tmp/meshid-idle-x1/s.toml"
    )
    out = portable(printed, Path("/src/m"), "/tmp")
    assert out == "static: idle RSS 44.9 MiB: .venv/bin/meshid run --config $WORK/s.toml"

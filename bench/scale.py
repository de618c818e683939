"""The sidecar at scale, written into bench/RESULTS.md: idle memory, large allow-lists, re-judging.

    python -m bench.scale [--out bench/RESULTS.md]

Runs, each in a process of its own and with its own printed commands,
`bench.idle_rss` (an idle sidecar's RSS in each mode), `bench.policy_decision`
(a decision's cost at 10, 1,000 and 100,000 rules, as ratios to 10) and
`bench.rejudge` (a policy change over 20,000 live connections), and puts what
they print into one section of RESULTS.md, just before the fan-out's (which
`bench.fanout` keeps last). `make bench` runs it after `bench.run`, which
rewrites the file. A part that fails is written as failed, with its exit
status; the others still run.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.fanout import MARKER as FANOUT_MARKER

MARKER = "<!-- scale: written by python -m bench.scale -->"
PARTS = (
    (
        "Idle sidecar memory",
        "bench.idle_rss",
        "RSS after start, against a 30 MiB target and the libraries alone",
    ),
    ("Policy decision cost", "bench.policy_decision", "median per decision; ratios to 10 rules"),
    ("Re-judging 20,000 live connections", "bench.rejudge", "median of the rounds"),
)
TIME_LIMIT = 900  # seconds per part: every part is bounded by its own loops too


def section(outputs: list[tuple[str, str, str, str]]) -> str:
    """The section: for each part, its title, what it measures, the command, what it printed."""
    lines = [MARKER, "## The sidecar at scale (`python -m bench.scale`)", ""]
    for title, module, note, printed in outputs:
        lines += [
            f"### {title}",
            "",
            f"`python -m {module}` ({note}):",
            "",
            "```text",
            printed.rstrip("\n") or "(nothing printed)",
            "```",
            "",
        ]
    return "\n".join(lines)


def insert(text: str, new: str) -> str:
    """`text` with its scale section replaced by `new`, placed before the fan-out's if any."""
    before, _, after = text.partition(MARKER)
    if after:  # drop the old section: up to the fan-out's marker, or to the end
        _, marker, rest = after.partition(FANOUT_MARKER)
        text = before.rstrip("\n") + ("\n\n" + marker + rest if marker else "")
    head, marker, rest = text.partition(FANOUT_MARKER)
    joined = head.rstrip("\n") + "\n\n" + new.rstrip("\n") + "\n"
    return joined + ("\n" + marker + rest if marker else "")


def portable(printed: str, root: Path, tmp: str) -> str:
    """What a part printed, with this checkout's and the temporary directory's paths made
    relative (`.venv/bin/meshid`, `$WORK/…`): the results read the same on any machine."""
    printed = printed.replace(f"{root}/", "")
    return re.sub(re.escape(tmp.rstrip("/")) + r"/[^/\s]+", "$WORK", printed)


def run(module: str) -> str:
    try:
        done = subprocess.run(
            [sys.executable, "-m", module],
            capture_output=True,
            text=True,
            timeout=TIME_LIMIT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"failed: no result within {TIME_LIMIT} s"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        return done.stdout + f"failed: exit status {done.returncode}: {last}"
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/RESULTS.md"))
    args = parser.parse_args()
    outputs = []
    for title, module, note in PARTS:
        printed = portable(run(module), Path.cwd(), tempfile.gettempdir())
        print(f"{module}:\n{printed}", flush=True)
        outputs.append((title, module, note, printed))
    old = args.out.read_text() if args.out.exists() else ""
    args.out.write_text(insert(old, section(outputs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

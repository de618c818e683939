#!/usr/bin/env python3
"""Rewrite the README's table of reasons from `meshid.reasons` (``--check``: only compare).

The table sits between ``<!-- reasons:begin -->`` and ``<!-- reasons:end -->``;
everything outside the markers is left as it is. `make reasons` runs this.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshid.reasons import markdown_table

BEGIN = "<!-- reasons:begin -->"
END = "<!-- reasons:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def rewrite(text: str) -> str:
    """`text` with the table between the markers replaced by the generated one."""
    start = text.index(BEGIN) + len(BEGIN)
    end = text.index(END, start)
    return text[:start] + "\n" + markdown_table() + text[end:]


def main(argv: list[str]) -> int:
    text = README.read_text()
    try:
        wanted = rewrite(text)
    except ValueError:
        print(f"{README.name}: no {BEGIN} … {END} markers", file=sys.stderr)
        return 2
    if wanted == text:
        return 0
    if "--check" in argv:
        print(f"{README.name}: the reasons table is stale; run 'make reasons'", file=sys.stderr)
        return 1
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

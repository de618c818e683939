"""The import layering, checked from the source: dependencies point one way.

- `meshid/` is the shared kernel: pure logic over the stdlib and
  `cryptography`. It imports no I/O runtime (trio, sockets, TLS connections,
  databases, processes, HTTP, the filesystem), so everything in it can be
  tested without a network or a disk. The few modules that are I/O by nature
  are listed in KERNEL_EXCEPTIONS with the reason they exist.
- `ca/` and `sidecar/` never import each other: what both need lives in
  `meshid/`.

The check reads every module with `ast`, so an import inside a function counts
as much as one at the top, and a module need not be importable to be checked.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top-level modules the kernel must not import: each brings sockets, files,
# processes, threads or an event loop. `OpenSSL` is banned only for its
# connection layer (`OpenSSL.SSL`); its certificate helpers are pure.
KERNEL_FORBIDDEN = frozenset(
    {
        "asyncio",
        "ca",
        "fcntl",
        "ftplib",
        "h11",
        "http",
        "io",
        "multiprocessing",
        "os",
        "pathlib",
        "prometheus_client",
        "psycopg",
        "select",
        "selectors",
        "shutil",
        "sidecar",
        "signal",
        "socket",
        "socketserver",
        "sqlite3",
        "ssl",
        "subprocess",
        "tempfile",
        "threading",
        "trio",
        "urllib",
    }
)
KERNEL_FORBIDDEN_EXACT = frozenset({"OpenSSL.SSL"})
# Pure parts of otherwise forbidden packages: string parsing, no I/O.
KERNEL_PURE = ("urllib.parse",)

# Kernel modules allowed a named I/O import, and why.
KERNEL_EXCEPTIONS: dict[str, dict[str, str]] = {
    # The one state-file writer both sides share (write beside, fsync, rename,
    # mode 0600 from the first byte); it is file I/O by definition.
    "meshid.files": {"os": "open/fsync/rename", "pathlib": "paths of state files"},
    # The root `meshid` command: the process edge, where the environment is read
    # and errors become an exit code. Subcommand packages are loaded by name
    # (importlib), so the kernel still imports neither `ca` nor `sidecar`.
    "meshid.cli": {"os": "environment variables of the command line"},
}

# Each side of the control plane, and the other side it must never import.
INDEPENDENT = {"ca": "sidecar", "sidecar": "ca"}


@dataclass(frozen=True)
class Violation:
    module: str
    line: int
    imported: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.imported}"


def imported_names(module: str, source: str) -> list[tuple[int, str]]:
    """Every absolute module name `source` imports, with its line (relative ones resolved)."""
    package = module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: max(0, len(parts) - node.level + 1)])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # `from OpenSSL import SSL` imports OpenSSL.SSL.
            found.extend((node.lineno, f"{name}.{alias.name}") for alias in node.names)
    return found


def first_per_package(found: list[Violation]) -> list[Violation]:
    """One violation per line and imported package (`from os import path` is one, not two)."""
    seen: set[tuple[int, str]] = set()
    out = []
    for v in found:
        key = (v.line, v.imported.split(".")[0])
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def kernel_violations(module: str, source: str) -> list[Violation]:
    allowed = KERNEL_EXCEPTIONS.get(module, {})
    out = []
    for line, name in imported_names(module, source):
        top = name.split(".")[0]
        pure = any(name == p or name.startswith(p + ".") for p in KERNEL_PURE)
        banned = not pure and (top in KERNEL_FORBIDDEN or name in KERNEL_FORBIDDEN_EXACT)
        if banned and top not in allowed and name not in allowed:
            out.append(Violation(module, line, name))
    return first_per_package(out)


def side_violations(module: str, source: str) -> list[Violation]:
    other = INDEPENDENT[module.split(".")[0]]
    return first_per_package(
        [
            Violation(module, line, name)
            for line, name in imported_names(module, source)
            if name.split(".")[0] == other
        ]
    )


def modules(root: Path, package: str) -> list[tuple[str, str]]:
    """(dotted name, source) of every module under root/package."""
    out = []
    for path in sorted((root / package).rglob("*.py")):
        # A package's __init__ keeps its name, so its relative imports resolve from the package.
        parts = path.relative_to(root).with_suffix("").parts
        out.append((".".join(parts), path.read_text(encoding="utf-8")))
    return out


def check_tree(root: Path) -> list[Violation]:
    found = []
    for module, source in modules(root, "meshid"):
        found += kernel_violations(module, source)
    for side in INDEPENDENT:
        for module, source in modules(root, side):
            found += side_violations(module, source)
    return found


def test_the_tree_keeps_its_layers() -> None:
    assert [str(v) for v in check_tree(ROOT)] == []


def test_every_package_is_seen() -> None:
    # A check that finds no modules passes trivially; make sure it reads the real tree.
    names = {m for package in ("meshid", "ca", "sidecar") for m, _ in modules(ROOT, package)}
    assert {"meshid.svid", "meshid.files", "ca.server", "sidecar.app"} <= names
    assert set(KERNEL_EXCEPTIONS) <= names


@pytest.mark.parametrize(
    "source",
    [
        "import trio",
        "import socket",
        "from OpenSSL import SSL",
        "import OpenSSL.SSL",
        "import sqlite3",
        "import subprocess as sp",
        "from os import path",
        "def f():\n    import ssl\n",
        "from sidecar.config import load",
        "from ca import server",
    ],
)
def test_a_kernel_io_import_is_caught(source: str) -> None:
    assert kernel_violations("meshid.policy", source)


@pytest.mark.parametrize(
    "source",
    [
        "from cryptography import x509",
        "from OpenSSL import crypto",
        "import json, re, base64",
        "from meshid.errors import MeshIdError",
        "from .errors import MeshIdError",
    ],
)
def test_pure_kernel_imports_pass(source: str) -> None:
    assert kernel_violations("meshid.policy", source) == []


def test_an_exception_covers_only_its_module_and_name() -> None:
    assert kernel_violations("meshid.files", "import os") == []
    assert kernel_violations("meshid.files", "import trio")
    assert kernel_violations("meshid.svid", "import os")


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("ca.server", "from sidecar.config import SidecarConfig"),
        ("ca.server", "import sidecar"),
        ("sidecar.app", "from ca.api import Request"),
        ("sidecar.tlsio", "def f():\n    from ca import issuer\n"),
    ],
)
def test_a_cross_import_is_caught(module: str, source: str) -> None:
    assert side_violations(module, source)


def test_relative_imports_within_a_side_pass() -> None:
    assert side_violations("ca.server", "from .api import Request\nfrom meshid import svid") == []


def test_the_check_fails_on_a_tree_with_a_bad_module(tmp_path: Path) -> None:
    for package in ("meshid", "ca", "sidecar"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text('"""A package."""\n')
    assert check_tree(tmp_path) == []
    (tmp_path / "meshid" / "clock.py").write_text("import trio\n")
    (tmp_path / "sidecar" / "peek.py").write_text("from ca.store import Store\n")
    assert sorted(str(v) for v in check_tree(tmp_path)) == [
        "meshid.clock:1 imports trio",
        "sidecar.peek:1 imports ca.store",
    ]

"""Every reason the code emits is a member of `Reason`, every member is used, the README agrees.

The walk looks at the shapes reasons are written in: a ``reason=`` (or
``close_reason=``) keyword, the ``reason`` class attribute of an error, a
``reason`` variable, the reason argument of `Verdict`, `error`, `_unavailable`,
`_shed`, `StreamAborted`, `close_all`, the last argument of a metric's
``labels(...)``, a ``"reason"``/``"error"`` key of a dict, and what the
functions that name a reason (``*_reason``, ``admit``, ``overdue``…) return.
A name in capitals is read as the module constant it names.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from meshid.reasons import PUBLISHED, Reason, markdown_table

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("meshid", "ca", "sidecar", "adminhttp")
# call name -> index of the positional argument that is a reason
REASON_ARGUMENT = {
    "Verdict": 1,
    "error": 1,
    "_shed": 1,
    "_unavailable": 0,
    "StreamAborted": 0,
    "close_all": 0,
    "_permanent": 0,  # sidecar.failures: the classifier's verdicts
    "_transient": 0,
}
REASON_FUNCTIONS = ("reason", "admit", "overdue", "now_denied")


def _modules() -> dict[Path, ast.Module]:
    return {
        path: ast.parse(path.read_text(), str(path))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "reasons.py"
    }


def _constants(trees: dict[Path, ast.Module]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for tree in trees.values():
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                found.setdefault(node.targets[0].id, set()).add(node.value.value)
    return found


def _call_name(node: ast.Call) -> str:
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return node.func.id if isinstance(node.func, ast.Name) else ""


def reason_literals() -> dict[str, list[str]]:
    """Every string the code writes where a reason goes, and where it is."""
    trees = _modules()
    constants = _constants(trees)
    found: dict[str, list[str]] = {}

    def strings(node: ast.AST | None) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, ast.IfExp):
            return strings(node.body) | strings(node.orelse)
        if isinstance(node, ast.BoolOp):
            return set().union(*(strings(v) for v in node.values))
        if isinstance(node, ast.Name) and node.id.isupper():
            return constants.get(node.id, set())
        return set()

    def add(node: ast.AST | None, where: str) -> None:
        for text in strings(node):
            found.setdefault(text, []).append(where)

    for path, tree in trees.items():
        name = path.relative_to(ROOT)
        for node in ast.walk(tree):
            where = f"{name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call):
                call = _call_name(node)
                for kw in node.keywords:
                    if kw.arg in ("reason", "close_reason"):
                        add(kw.value, where)
                index = REASON_ARGUMENT.get(call)
                if index is not None and len(node.args) > index:
                    add(node.args[index], where)
                if call == "labels" and len(node.args) >= 2:
                    add(node.args[-1], where)
            elif isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign | ast.AnnAssign):
                        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                        if any(isinstance(t, ast.Name) and t.id == "reason" for t in targets):
                            add(stmt.value, where)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if (isinstance(target, ast.Name) and target.id == "reason") or (
                        isinstance(target, ast.Attribute) and target.attr == "close_reason"
                    ):
                        add(node.value, where)
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value in ("reason", "error"):
                        add(value, where)
            elif isinstance(node, ast.FunctionDef) and any(
                word in node.name for word in REASON_FUNCTIONS
            ):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Return):
                        add(inner.value, f"{name}:{inner.lineno}")
                    elif isinstance(inner, ast.Tuple) and len(inner.elts) == 2:
                        add(inner.elts[1], f"{name}:{inner.lineno}")
    return found


def _used_members() -> set[str]:
    """Members named as `Reason.X` anywhere in the code."""
    used: set[str] = set()
    for tree in _modules().values():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "Reason"
            ):
                used.add(Reason[node.attr].value)
    return used


def test_every_reason_the_code_writes_is_a_member() -> None:
    literals = reason_literals()
    members = {r.value for r in Reason}
    strays = {text: where[:3] for text, where in literals.items() if text not in members}
    assert not strays, f"reasons missing from meshid/reasons.py: {strays}"


def test_the_walk_finds_the_known_shapes() -> None:
    """The walk is not vacuous: a reason of each shape is found."""
    literals = reason_literals()
    for text in (
        "not_tls",
        "peer_truncated",
        "handshake_timeout",
        "source_limit",
        "rejected_by_peer",
    ):
        assert text in literals, text


def test_no_member_is_dead() -> None:
    used = set(reason_literals()) | _used_members()
    dead = sorted(r.value for r in Reason if r.value not in used)
    assert not dead, f"reasons nothing emits: {dead}"


def test_every_member_says_what_it_means() -> None:
    for reason in Reason:
        assert reason.description, reason
        assert reason.value.replace("_", "").isalpha() and reason.value.islower(), reason
        assert "\n" not in reason.description and "|" not in reason.description


def test_the_readme_table_is_generated_from_the_published_reasons() -> None:
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- reasons:begin -->\n", "<!-- reasons:end -->"
    table = readme[readme.index(begin) + len(begin) : readme.index(end)]
    assert table == markdown_table()
    listed = [row.split("`")[1] for row in table.splitlines()[2:]]
    assert listed == [r.value for r in PUBLISHED]


def test_the_regeneration_tool_rewrites_only_between_the_markers() -> None:
    spec = importlib.util.spec_from_file_location("reasons_table", ROOT / "tools/reasons_table.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    stale = "before\n<!-- reasons:begin -->\n| old |\n<!-- reasons:end -->\nafter\n"
    fresh = tool.rewrite(stale)
    assert (
        fresh == f"before\n<!-- reasons:begin -->\n{markdown_table()}<!-- reasons:end -->\nafter\n"
    )
    assert tool.rewrite(fresh) == fresh

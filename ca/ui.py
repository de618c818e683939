"""The service graph page (`meshid ca serve --ui HOST:PORT`).

Read-only and off by default. The poller reads the allow-list, the sidecars'
reports and the roots' state in the database thread (`refresh`, at most every
REFRESH_EVERY seconds); a request only renders the last snapshot, never
touching the database from the event loop. The page is server-rendered HTML
with an inline SVG; a small inline script fetches the page again every few
seconds and swaps its content in, so there is no front-end build.

Everything a sidecar reports is hostile: every string on the page passes
through `html.escape`, and the script moves parsed nodes, never markup. No
secret is ever read into the snapshot (no keys, no tokens, no token hashes):
only identities, counts, serials, expiries and bundle sequences.

The listener is `adminhttp`'s, like `--metrics`: GET and HEAD only, deadlines
and connection caps; with `--workers N`, worker i serves PORT+i.
"""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from html import escape

import trio

from adminhttp import Response
from ca.authority import Authority
from ca.metrics import serve_routes
from ca.values import SidecarReport
from meshid.clock import Clock
from meshid.policy import Policy
from meshid.skew import format_skew

REFRESH_EVERY = 5.0  # seconds between two reads of the database for the page
MAX_NODES = 500  # drawn in the SVG; past it the tables still list everything
HTML_TYPE = "text/html; charset=utf-8"
JSON_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    target: str
    allowed: bool
    live: int
    refused: tuple[tuple[str, str, int], ...] = ()  # (deny or cut, reason, count) last hour


@dataclass(frozen=True, slots=True)
class Sidecar:
    spiffe_id: str
    instance: str
    seen: str
    svid_serial: str
    svid_not_after: str
    bundle_sequence: int
    live_connections: int
    clock_skew: float | None = None  # seconds against the authority's clock; None: no reading


@dataclass(frozen=True, slots=True)
class Graph:
    """One snapshot of what the page shows; built by `build_graph`, pure."""

    at: str
    nodes: tuple[str, ...]
    edges: tuple[Edge, ...]
    sidecars: tuple[Sidecar, ...]
    rollover: str

    def to_json(self) -> dict[str, object]:
        return {
            "at": self.at,
            "nodes": list(self.nodes),
            "edges": [
                {
                    "from": e.source,
                    "to": e.target,
                    "allowed": e.allowed,
                    "live": e.live,
                    "refused": [{"kind": k, "reason": r, "count": n} for k, r, n in e.refused],
                }
                for e in self.edges
            ],
            "sidecars": [
                {
                    "spiffe_id": s.spiffe_id,
                    "instance": s.instance,
                    "seen": s.seen,
                    "svid_serial": s.svid_serial,
                    "svid_not_after": s.svid_not_after,
                    "bundle_sequence": s.bundle_sequence,
                    "live_connections": s.live_connections,
                    "clock_skew": s.clock_skew,
                }
                for s in self.sidecars
            ],
            "rollover": self.rollover,
        }


EMPTY = Graph("", (), (), (), "not read yet")


def _iso(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"


def build_graph(
    policy: Policy, reports: Iterable[SidecarReport], rollover: str, now: datetime
) -> Graph:
    """Nodes are identities, edges the allowed pairs plus any pair seen connected.

    A pair's live count is the larger of what its client reports outbound and
    what its server reports inbound (both ends report the same connections);
    so is each count of refusals and cuts, by kind and reason.
    """
    reports = list(reports)
    outbound: dict[tuple[str, str], int] = {}
    inbound: dict[tuple[str, str], int] = {}
    refused: dict[tuple[str, str], dict[tuple[str, str, str], int]] = {}
    for r in reports:
        me = str(r.spiffe_id)
        for p in r.report.pairs:
            peer = str(p.peer_id)
            key, counts = (
                ((me, peer), outbound) if p.direction == "outbound" else ((peer, me), inbound)
            )
            counts[key] = counts.get(key, 0) + p.count
        for x in r.report.refusals:
            peer = str(x.peer_id)
            key = (me, peer) if x.direction == "outbound" else (peer, me)
            per = refused.setdefault(key, {})
            end = (x.direction, x.kind, x.reason)
            per[end] = per.get(end, 0) + x.count
    allowed = {(str(s), str(t)) for s, t in policy.pairs}
    keys = sorted(allowed | outbound.keys() | inbound.keys() | refused.keys())
    edges = tuple(
        Edge(
            s,
            t,
            (s, t) in allowed,
            max(outbound.get((s, t), 0), inbound.get((s, t), 0)),
            _merge_ends(refused.get((s, t), {})),
        )
        for s, t in keys
    )
    nodes = sorted(
        {n for e in edges for n in (e.source, e.target)} | {str(r.spiffe_id) for r in reports}
    )
    sidecars = tuple(
        Sidecar(
            str(r.spiffe_id),
            r.instance,
            _iso(r.seen),
            r.report.svid_serial or "-",
            _iso(r.report.svid_not_after),
            r.report.bundle_sequence,
            r.report.live_connections,
            r.skew,
        )
        for r in reports
    )
    return Graph(_iso(now), tuple(nodes), edges, sidecars, rollover)


def _merge_ends(counts: dict[tuple[str, str, str], int]) -> tuple[tuple[str, str, int], ...]:
    """(kind, reason, count): the larger of the client's and the server's count."""
    merged: dict[tuple[str, str], int] = {}
    for (_, kind, reason), count in counts.items():
        merged[kind, reason] = max(merged.get((kind, reason), 0), count)
    return tuple((k, r, n) for (k, r), n in sorted(merged.items()))


def _refused_text(edge: Edge) -> str:
    return ", ".join(f"{n} {k} {r}" for k, r, n in edge.refused) or "-"


def _layout(nodes: tuple[str, ...], size: float) -> dict[str, tuple[float, float]]:
    """Nodes on a circle: no physics, stable between refreshes for the same set."""
    drawn = nodes[:MAX_NODES]
    radius = size / 2 - 60
    return {
        n: (
            size / 2 + radius * math.cos(2 * math.pi * i / max(1, len(drawn)) - math.pi / 2),
            size / 2 + radius * math.sin(2 * math.pi * i / max(1, len(drawn)) - math.pi / 2),
        )
        for i, n in enumerate(drawn)
    }


def _svg(graph: Graph) -> str:
    size = 640.0
    at = _layout(graph.nodes, size)
    parts = [
        f'<svg id="graph" xmlns="http://www.w3.org/2000/svg" width="{size:.0f}" '
        f'height="{size:.0f}" viewBox="0 0 {size:.0f} {size:.0f}" role="img" '
        'style="overflow:visible;margin:0 12em">'
    ]
    for e in graph.edges:
        if e.source not in at or e.target not in at:
            continue
        (x1, y1), (x2, y2) = at[e.source], at[e.target]
        # each direction 3 px to its own side, so A -> B and B -> A stay apart
        length = math.hypot(x2 - x1, y2 - y1) or 1.0
        dx, dy = 3 * (y2 - y1) / length, -3 * (x2 - x1) / length
        x1, y1, x2, y2 = x1 + dx, y1 + dy, x2 + dx, y2 + dy
        colour = "#2a7" if e.allowed else "#c33"
        width = 1 + min(6, e.live)
        label = f"{e.source} → {e.target}: {e.live} live" + ("" if e.allowed else " (not allowed)")
        if e.refused:
            label += f"; last hour: {_refused_text(e)}"
        parts.append(
            f'<line class="edge" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
            f'stroke="{colour}" stroke-width="{width}"><title>{escape(label)}</title></line>'
        )
    for n, (x, y) in at.items():
        parts.append(
            f'<g class="node"><circle cx="{x:.1f}" cy="{y:.1f}" r="7" fill="#36c"/>'
            f'<text x="{x + (10 if x >= size / 2 else -10):.1f}" y="{y + 4:.1f}" '
            f'text-anchor="{"start" if x >= size / 2 else "end"}" font-size="11">'
            f"{escape(n)}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _rows(rows: Iterable[Iterable[object]]) -> str:
    return "".join(
        "<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows
    )


# Fetches the page again and moves the new <main> in: parsed nodes, never markup strings.
SCRIPT = """
(function () {
  function refresh() {
    fetch(location.pathname, {cache: "no-store"}).then(function (r) {
      if (!r.ok) { throw new Error("status " + r.status); }
      return r.text();
    }).then(function (text) {
      var doc = new DOMParser().parseFromString(text, "text/html");
      var fresh = doc.getElementById("content");
      var old = document.getElementById("content");
      if (fresh && old) { old.replaceWith(document.adoptNode(fresh)); }
      document.getElementById("status").textContent = "";
    }).catch(function () {
      document.getElementById("status").textContent = "authority unreachable; retrying";
    });
  }
  setInterval(refresh, 5000);
})();
"""


def render_page(graph: Graph) -> str:
    """The whole page; every value that came from outside is escaped."""
    edges = _rows(
        (e.source, e.target, "yes" if e.allowed else "no", e.live, _refused_text(e))
        for e in graph.edges
    )
    sidecars = _rows(
        (
            s.spiffe_id,
            s.instance,
            s.seen,
            s.svid_serial,
            s.svid_not_after,
            s.bundle_sequence,
            s.live_connections,
            "-" if s.clock_skew is None else format_skew(s.clock_skew),
        )
        for s in graph.sidecars
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<title>meshid service graph</title>"
        '<link rel="icon" href="data:,">'
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px;text-align:left}</style>"
        '</head><body><h1>meshid service graph</h1><p id="status"></p>'
        f'<main id="content"><p>As of {escape(graph.at)}. '
        f'Root rollover: <span id="rollover">{escape(graph.rollover)}</span>. '
        f"{len(graph.nodes)} identities, {len(graph.edges)} edges.</p>"
        f"{_svg(graph)}"
        '<h2>Edges</h2><table id="edges"><tr><th>from</th><th>to</th><th>allowed</th>'
        "<th>live connections</th><th>refused or cut, last hour (reason)</th></tr>"
        f"{edges}</table>"
        '<h2>Sidecars</h2><table id="sidecars"><tr><th>identity</th><th>instance</th>'
        "<th>last report</th><th>SVID serial</th><th>SVID expires</th>"
        "<th>bundle sequence</th><th>live connections</th><th>clock skew</th></tr>"
        f"{sidecars}</table>"
        f"</main><script>{SCRIPT}</script></body></html>"
    )


class ServiceGraph:
    """The snapshot one worker shows; refreshed by the poller in the database thread."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.graph = EMPTY
        self._read_at = -REFRESH_EVERY

    def refresh(self, authority: Authority) -> None:
        now = self.clock.monotonic()
        if now - self._read_at < REFRESH_EVERY:
            return
        self._read_at = now
        active, pending = authority.root_lifecycle()
        rollover = f"generation {active.generation} active until {_iso(active.not_after)}"
        if pending is not None:
            waits = ", waiting for sidecars to hold it" if pending.wait_for_acks else ""
            takes = _iso(pending.activate_at)
            rollover += f"; generation {pending.generation} takes over at {takes}{waits}"
        sequence = authority.versions()[2]
        rollover += f"; current bundle sequence {sequence}"
        reports, _ = authority.reports()
        self.graph = build_graph(authority.policy(), reports, rollover, self.clock.wall())

    def route(self, method: str, path: str) -> Response:
        """/ (the page), /graph.json (the same snapshot for machines), /healthz."""
        if path == "/":
            return Response(200, render_page(self.graph).encode(), HTML_TYPE)
        if path == "/graph.json":
            return Response(200, json.dumps(self.graph.to_json()).encode(), JSON_TYPE)
        if path == "/healthz":
            return Response(200, b"ok\n")
        return Response(404, b"not found\n")


async def serve_ui(
    sock: socket.socket,
    graph: ServiceGraph,
    log: Callable[..., None],
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the page on `sock` (bound and listening) until cancelled; logs where."""
    await serve_routes(sock, graph.route, log, "ui_serving", task_status=task_status)

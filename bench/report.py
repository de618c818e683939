"""Medians, ratios, targets, and the Markdown of RESULTS.md.

Everything in RESULTS.md comes from one run: the figures, the commands as
run, the versions, the CPU accounting and the profile summaries. The prose
that says what limits a figure is written here per workload, with the
numbers of this run filled in.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.profiling import Profile, py_spy_path
from bench.workloads import Figure, Sample, Workload


@dataclass
class WorkloadResult:
    workload: Workload
    samples: dict[str, list[Sample]] = field(default_factory=dict)  # topology -> reps
    commands: dict[str, list[str]] = field(default_factory=dict)
    chain_commands: dict[str, list[str]] = field(default_factory=dict)
    profiled: dict[str, Sample] = field(default_factory=dict)
    profiles: dict[str, list[Profile]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def median(self, topo: str, key: str) -> float | None:
        values = [s.values[key] for s in self.samples.get(topo, []) if key in s.values]
        return statistics.median(values) if values else None

    def detail(self, topo: str, key: str) -> float | None:
        values = [s.details[key] for s in self.samples.get(topo, []) if key in s.details]
        return statistics.median(values) if values else None

    def detail_keys(self, topo: str) -> list[str]:
        keys: dict[str, None] = {}
        for s in self.samples.get(topo, []):
            keys.update(dict.fromkeys(s.details))
        return list(keys)


@dataclass
class RunResult:
    reps: int
    nofile: int
    workdir: Path
    workloads: list[WorkloadResult] = field(default_factory=list)
    setup_commands: list[str] = field(default_factory=list)
    backend_commands: list[str] = field(default_factory=list)
    seconds: float = 0.0
    load_before: str = ""
    load_after: str = ""
    skipped: dict[str, list[str]] = field(default_factory=dict)  # why -> workloads not run


# -- versions -------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0].strip() if text else "unavailable"


def _stunnel_version() -> str:
    try:
        done = subprocess.run(["stunnel4", "-version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    lines = (done.stdout + done.stderr).splitlines()
    return "; ".join(line.strip() for line in lines if line.startswith(("stunnel ", "Compiled")))


def versions() -> list[tuple[str, str]]:
    from importlib.metadata import version

    from OpenSSL import SSL

    rev = _first_line(["git", "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout.strip()
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    spy = py_spy_path()
    return [
        ("meshid git rev", rev + (" (with uncommitted changes in tracked files)" if dirty else "")),
        ("machine", f"{os.cpu_count()} vCPU {cpu}, Linux {platform.release()}"),
        ("python", sys.version.split()[0]),
        ("openssl (system; stunnel's)", _first_line(["openssl", "version"])),
        ("OpenSSL under pyOpenSSL (meshid's)", SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()),
        (
            "pyOpenSSL / cryptography / trio",
            " / ".join(version(p) for p in ("pyOpenSSL", "cryptography", "trio")),
        ),
        ("stunnel", _stunnel_version()),
        ("wrk", _first_line(["wrk", "-v"])),
        ("nginx", _first_line(["nginx", "-v"])),
        ("iperf3", _first_line(["iperf3", "--version"])),
        ("py-spy", _first_line([str(spy), "--version"]) if spy else "not installed"),
    ]


# -- formatting -----------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    if digits == 0 and abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.{max(digits, 1 if abs(value) < 100 else 0)}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}x"


def primary(r: WorkloadResult) -> str:
    """The topology a workload's figures belong to: meshid's sidecars, or what it alone runs."""
    topologies = r.workload.topologies
    return "meshid" if "meshid" in topologies else topologies[0]


def target_status(r: WorkloadResult, fig: Figure) -> str:
    t = fig.target
    if t is None:
        return ""
    mine = r.median(primary(r), fig.key)
    if mine is None:
        return "not measured"
    if t.kind == "min":
        ok = mine >= t.value
        return f"{'met' if ok else '**missed**'} ({mine:,.0f} {fig.unit})"
    if t.kind == "vs_stunnel":
        theirs = r.median("stunnel", fig.key)
        if theirs is None:
            return "no stunnel figure"
        ok = mine / theirs >= t.value
        return f"{'met' if ok else '**missed**'} ({mine / theirs:.2f}x)"
    ok = mine <= t.value
    return f"{'met' if ok else '**missed**'} ({mine:.1f} {fig.unit})"


def headline(run: RunResult) -> list[str]:
    rows = [
        "| figure | meshid | stunnel | direct TCP | meshid / stunnel | meshid / direct | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in run.workloads:
        if r.workload.compare is not None:
            continue  # a pair of its own: see `comparison`
        for fig in r.workload.figures:
            m, s, d = (r.median(t, fig.key) for t in (primary(r), "stunnel", "direct"))
            target = f"{fig.target.text}: {target_status(r, fig)}" if fig.target else ""
            rows.append(
                f"| {fig.title} ({fig.unit}) | {_fmt(m, fig.digits)} | {_fmt(s, fig.digits)} | "
                f"{_fmt(d, fig.digits)} | {_ratio(m, s)} | {_ratio(m, d)} | {target} |"
            )
    return rows


def _pairs(run: RunResult) -> list[tuple[WorkloadResult, str, str]]:
    """The workloads measured as a pair of topologies (measured, baseline), not against stunnel."""
    return [(r, *r.workload.compare) for r in run.workloads if r.workload.compare is not None]


def comparison(run: RunResult) -> list[str]:
    """The paired figures (transparent against explicit) and their ratio, or why they are not."""
    lines: list[str] = []
    pairs = _pairs(run)
    if pairs:
        mine, base = pairs[0][1], pairs[0][2]
        lines += [
            f"| figure | {mine} | {base} | {mine} / {base} |",
            "|---|---|---|---|",
        ]
        for r, mine, base in pairs:
            for fig in r.workload.figures:
                m, b = r.median(mine, fig.key), r.median(base, fig.key)
                lines.append(
                    f"| {fig.title} ({fig.unit}) | {_fmt(m, fig.digits)} | "
                    f"{_fmt(b, fig.digits)} | {_ratio(m, b)} |"
                )
        lines.append("")
    for why, names in run.skipped.items():
        lines += [f"Not measured ({', '.join(names)}): {why}.", ""]
    return lines


def _transparent_section(run: RunResult) -> list[str]:
    lines = comparison(run)
    if not lines:
        return []
    return [
        "### Transparent interception",
        "",
        "An unchanged client on web's host asks api's real address (198.18.0.3:8080): nftables "
        "captures the connection, web's sidecar reads `SO_ORIGINAL_DST` and looks the identity "
        "up in the address map. The baseline is the same client, in the same run, asking web's "
        "explicit outbound listener (127.0.0.1:15002) instead; both reach api's captured "
        "inbound port, through the same two sidecars. The hosts are network namespaces on this "
        "machine joined by a bridge (veth pairs, not loopback), made and removed by the bench; "
        "the sidecars are enrolled by a `meshid ca serve` on a third host (dynamic mode, so "
        "that the address map reaches web), configured in `$WORK/transparent-*/{web,api}.toml` "
        "(see `bench/netns.py`).",
        "",
        *lines,
    ]


def summary(run: RunResult) -> list[str]:
    """The paired figures as the bench prints them when it ends, one line each."""
    out = []
    for r, mine, base in _pairs(run):
        for fig in r.workload.figures:
            m, b = r.median(mine, fig.key), r.median(base, fig.key)
            out.append(
                f"{mine} / {base}: {fig.title} {_fmt(m, fig.digits)} / {_fmt(b, fig.digits)} "
                f"{fig.unit} = {_ratio(m, b)}"
            )
    return out


def _reps_table(r: WorkloadResult) -> list[str]:
    rows = ["| topology | figure | repetitions | median |", "|---|---|---|---|"]
    for topo in r.workload.topologies:
        for fig in r.workload.figures:
            vals = [s.values.get(fig.key) for s in r.samples.get(topo, [])]
            if not any(v is not None for v in vals):
                continue
            reps = ", ".join(_fmt(v, fig.digits) for v in vals)
            rows.append(
                f"| {topo} | {fig.title} ({fig.unit}) | {reps} | "
                f"{_fmt(r.median(topo, fig.key), fig.digits)} |"
            )
    return rows


def _details_table(r: WorkloadResult) -> list[str]:
    topos = [t for t in r.workload.topologies if r.samples.get(t)]
    keys: dict[str, None] = {}
    for t in topos:
        keys.update(dict.fromkeys(r.detail_keys(t)))
    rows = [
        "| median of the repetitions | " + " | ".join(topos) + " |",
        "|---|" + "---|" * len(topos),
    ]
    for k in keys:
        cells = [_fmt(r.detail(t, k), 2 if "per" in k or "%" in k else 0) for t in topos]
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    return rows


def _profile_lines(r: WorkloadResult) -> list[str]:
    out: list[str] = []
    for topo, profiles in r.profiles.items():
        prof_vals = r.profiled.get(topo)
        if prof_vals is not None:
            vals = ", ".join(
                f"{f.title} {_fmt(prof_vals.values.get(f.key), f.digits)} {f.unit}"
                for f in r.workload.figures
                if f.key in prof_vals.values
            )
            out.append(f"Profiled extra run ({topo}, py-spy attached): {vals}.")
            out.append("")
        for p in profiles:
            out.append(f"**{p.role}** — {p.samples} samples of work at 200 Hz")
            out.append("")
            out.append("| where the time goes (innermost Python frame) | % |")
            out.append("|---|---|")
            out.extend(f"| {name} | {pct:.1f} |" for name, pct in p.categories)
            out.append("")
            out.append("| top functions (self) | % |")
            out.append("|---|---|")
            out.extend(f"| `{name}` | {pct:.1f} |" for name, pct in p.leaf)
            if p.inclusive:
                out.append("")
                out.append(
                    "On the stack (inclusive %): "
                    + ", ".join(f"`{n}` {pct:.0f}" for n, pct in p.inclusive)
                )
            out.append("")
    return out


def render(run: RunResult) -> str:
    from bench.analysis import analyse

    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# meshid sidecar benchmark",
        "",
        f"Generated by `make bench` (`python -m bench.run`) on {now}; the whole run took "
        f"{run.seconds / 60:.1f} min. Every figure is the median of {run.reps} repetitions; "
        "the throughput workloads take theirs in turn across the topologies (direct, "
        "meshid, stunnel, then meshid, stunnel, direct, ...) with every chain up, so that "
        "load from other work on the machine falls on all of them alike. All traffic is on "
        "127.0.0.1 of one 2-vCPU machine, where the load generator, the "
        "backend and both proxies share the two cores. Raw rates on such machines swing "
        "between runs; the CPU cost per unit (per GiB, per request, per connection) is the "
        "steadier number.",
        "",
        "## Headline",
        "",
        *headline(run),
        "",
        *_transparent_section(run),
        *analyse(run),
        "",
        "## Versions",
        "",
        "| what | version |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in versions()],
        "",
        "## Setup (exact commands)",
        "",
        "`$WORK` is the run's temporary directory. Certificates and the policy:",
        "",
        "```",
        *run.setup_commands,
        '# policy.toml (static mode): [[allow]] from = "web" to = "api"',
        "```",
        "",
        'Backends (nginx-light in one process, `return 200 "ok\\n"`, keep-alive; iperf3 server):',
        "",
        "```",
        *[_portable(c) for c in run.backend_commands],
        "```",
        "",
        f"RLIMIT_NOFILE raised to {run.nofile} for the bench and every process it starts.",
        "The sidecar and stunnel configurations are written to `$WORK/meshid/*.toml` and "
        "`$WORK/stunnel/*.conf` (see `bench/topology.py`): static mode, the SVIDs above, "
        "TLS 1.3 only, mutual TLS, decision logs to files.",
        "",
    ]
    for r in run.workloads:
        w = r.workload
        lines += [f"## {w.title}", ""]
        for topo in w.topologies:
            cmds = r.chain_commands.get(topo, []) + r.commands.get(topo, [])
            if cmds:
                lines += [f"{topo}:", "", "```"]
                lines += [_portable(c) for c in cmds]
                lines += ["```", ""]
        for topo, err in r.errors.items():
            lines += [f"**{topo} failed**: {err}", ""]
        lines += [*_reps_table(r), "", *_details_table(r), ""]
        prof = _profile_lines(r)
        if prof:
            lines += ["### Profile (meshid)", "", *prof]
    return "\n".join(lines).rstrip() + "\n"


def to_json(run: RunResult) -> str:
    data = {
        r.workload.name: {
            topo: [{"values": s.values, "details": s.details} for s in samples]
            for topo, samples in r.samples.items()
        }
        for r in run.workloads
    }
    return json.dumps(data, indent=1, sort_keys=True)


def _portable(command: str) -> str:
    """A command as the report shows it: the run's temporary directories named, not spelled."""
    command = re.sub(r"/tmp/meshid-bench-\w+", "$WORK", command)
    return re.sub(r"/tmp/mpg-\w+", "$PGSOCKETDIR", command)  # the throwaway PostgreSQL's socket

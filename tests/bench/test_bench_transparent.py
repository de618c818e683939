"""The transparent part of the bench: reported as a pair with its ratio, or skipped in one line.

The figures come from a real run (`make bench`); here the report is fed
samples, and the one-line skip is checked against the reasons the machine
could give (not root, no nft), with the rest of the bench untouched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import netns, report
from bench.analysis import analyse
from bench.procs import Supervisor
from bench.run import run_workload, runnable
from bench.topology import Env
from bench.workloads import (
    WORKLOADS,
    Sample,
    SmallRequests,
    TransparentNewConnections,
    TransparentSmall,
)


def result(workload: object, samples: dict[str, list[float]], key: str) -> report.WorkloadResult:
    assert isinstance(workload, SmallRequests | TransparentNewConnections)
    r = report.WorkloadResult(workload)
    for topo, values in samples.items():
        r.samples[topo] = [Sample({key: v, "p50": 1.0, "p99": 2.0}) for v in values]
    return r


def run_with(*results: report.WorkloadResult) -> report.RunResult:
    run = report.RunResult(reps=3, nofile=1024, workdir=Path("/nonexistent"))
    run.workloads.extend(results)
    return run


def test_transparent_figures_are_a_pair_with_their_ratio_outside_the_stunnel_headline() -> None:
    small = result(
        TransparentSmall(), {"transparent": [900, 950, 1000], "explicit": [1000, 990, 1010]}, "rps"
    )
    newconn = result(
        TransparentNewConnections(), {"transparent": [300, 310], "explicit": [320, 330]}, "cps"
    )
    plain = result(SmallRequests(), {"meshid": [14000], "stunnel": [14000]}, "rps")
    run = run_with(plain, small, newconn)

    table = "\n".join(report.comparison(run))
    assert "| figure | transparent | explicit | transparent / explicit |" in table
    assert "| small req/s (req/s) | 950 | 1,000 | 0.95x |" in table
    assert "| new conns/s (conn/s) | 305 | 325 | 0.94x |" in table
    headline = "\n".join(report.headline(run))
    assert headline.count("small req/s") == 1  # the stunnel comparison's own row only
    assert "new conns/s" not in headline
    assert report.summary(run) == [
        "transparent / explicit: small req/s 950 / 1,000 req/s = 0.95x",
        "transparent / explicit: small p50 latency 1.000 / 1.000 ms = 1.00x",
        "transparent / explicit: small p99 latency 2.000 / 2.000 ms = 1.00x",
        "transparent / explicit: new conns/s 305 / 325 conn/s = 0.94x",
        "transparent / explicit: new-conn p50 latency 1.000 / 1.000 ms = 1.00x",
        "transparent / explicit: new-conn p99 latency 2.000 / 2.000 ms = 1.00x",
    ]


def test_without_root_the_transparent_part_is_skipped_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    selected, skipped = runnable(WORKLOADS)
    assert [w.name for w in selected] == ["bulk", "small", "newconn", "idle", "ca"]
    assert skipped == {
        "network namespaces and nftables need root": ["transparent-small", "transparent-newconn"]
    }
    run = run_with()
    run.skipped = skipped
    assert report.comparison(run) == [
        "Not measured (transparent-small, transparent-newconn): "
        "network namespaces and nftables need root.",
        "",
    ]


def test_without_nft_the_transparent_part_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(netns, "nft_path", lambda: None)
    assert netns.unavailable() == "no 'nft' command (Debian package nftables)"


def test_nothing_measured_nothing_said() -> None:
    plain = result(SmallRequests(), {"meshid": [14000], "stunnel": [14000]}, "rps")
    assert report.comparison(run_with(plain)) == []


def test_what_limits_the_transparent_figures_names_both_sidecars_costs() -> None:
    small = result(TransparentSmall(), {"transparent": [900], "explicit": [1000]}, "rps")
    for topo, web, api in (("transparent", 31.0, 30.0), ("explicit", 29.0, 30.5)):
        small.samples[topo][0].details.update(
            {
                "netns-meshid-web: CPU µs per request": web,
                "netns-meshid-api: CPU µs per request": api,
            }
        )
    text = " ".join(analyse(run_with(small)))
    assert "**Transparent interception, small requests** (transparent/explicit 0.90x)" in text
    assert "web's sidecar: 31 µs captured, 29 µs explicit" in text
    assert "api's, whose path is the same in both: 30 and 30 µs" in text


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_transparent_workload_measures_both_paths_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    """One short repetition on real hosts: both paths carry requests, the capture really routes."""
    why = netns.unavailable()
    if why is not None:
        pytest.skip(why)
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"no '{tool}' command; 'make bench' installs it")
    workload = TransparentSmall()
    workload.duration = 1
    with Supervisor(tmp_path) as sup:
        env = Env(tmp_path, Path(sys.executable).with_name("meshid"), Path(sys.executable), sup)
        measured = run_workload(workload, env, reps=1, profile=False, outdir=tmp_path)
        assert sup.procs == []  # every process the hosts ran is stopped
    assert measured.errors == {}
    for topo in ("explicit", "transparent"):
        [sample] = measured.samples[topo]
        assert sample.values["rps"] > 0
        assert sample.details["socket errors"] == 0 and sample.details["non-2xx responses"] == 0
    log = tmp_path / "netns-meshid-web.log"
    allowed = netns.events(log, "decision", decision="allow")
    captured = [d for d in allowed if d.get("original_dst") == netns.APP]
    explicit = [d for d in allowed if "original_dst" not in d]
    assert captured and explicit
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"meshid-bench-{os.getpid()}-" not in listed

"""The real CLI on three "hosts": network namespaces joined by a bridge.

Topology, every namespace named after this test run's pid:

    meshid-<pid>-auth  198.18.0.1   meshid ca serve --listen 198.18.0.1:8443
    meshid-<pid>-web   198.18.0.2   web's sidecar (and batch's), their clients
    meshid-<pid>-api   198.18.0.3   api's sidecar on :15001, the api app on 127.0.0.1:8080
    meshid-<pid>-br    (no address) br0, with one veth per host enslaved to it

The bridge lives in a fourth namespace, so the root namespace gains no
interface, route or address. Traffic goes only to 198.18.0.0/24 addresses
and to loopback inside the namespaces. The fixture stops every process it
started (by pid), deletes the namespaces (which takes the veth pairs and the
bridge with them) and checks that none is left, also when the test fails.

Without root, the `ip` command or the right to create a namespace, the test
skips and says which.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

MESHID = Path(sys.executable).with_name("meshid")
APPS = Path(__file__).with_name("netns_apps.py")
TD = "example.org"
SUBNET = 24
CA_ADDR = "198.18.0.1"
WEB_ADDR = "198.18.0.2"
API_ADDR = "198.18.0.3"
CA_LISTEN = f"{CA_ADDR}:8443"
API_INBOUND = f"{API_ADDR}:15001"
T = TypeVar("T")


def sid(name: str) -> str:
    return f"spiffe://{TD}/{name}"


def netns_unavailable() -> str | None:
    """Why this machine cannot run the test, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "no 'ip' command (iproute2); 'make test' installs it"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"meshid-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


# -- logs and waiting ----------------------------------------------------------


class LogFile:
    """The JSON lines a process wrote to its log file, re-read on every look."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[str]:
        try:
            return self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def find(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records()
            if r.get("event") == event and all(r.get(k) == v for k, v in match.items())
        ]

    def first(self, event: str, **match: Any) -> dict[str, Any] | None:
        found = self.find(event, **match)
        return found[0] if found else None


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: LogFile

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = "\n".join(self.log.lines()[-5:])
            pytest.fail(f"{self.name} exited with {self.popen.returncode}:\n{tail}")


def wait_for(
    what: str, condition: Callable[[], T | None], timeout: float, watch: Sequence[Proc] = ()
) -> T:
    """Poll `condition` until it holds; fail after `timeout` s or when a watched process dies."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        for proc in watch:
            proc.check_alive()
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:g}s")
        time.sleep(0.05)


# -- the network -----------------------------------------------------------------


@dataclass
class Network:
    tag: str
    logs: Path
    namespaces: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def ip(self, *args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def add_namespace(self, host: str) -> str:
        name = self.ns(host)
        self.ip("netns", "add", name)
        self.namespaces.append(name)
        self.ip("-n", name, "link", "set", "lo", "up")
        return name

    def create(self, hosts: dict[str, str]) -> None:
        bridge = self.add_namespace("br")
        self.ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        self.ip("-n", bridge, "link", "set", "br0", "up")
        for host, addr in hosts.items():
            ns = self.add_namespace(host)
            port = f"v-{host}"
            self.ip("-n", bridge, "link", "add", port, "type", "veth", "peer", "eth0", "netns", ns)
            self.ip("-n", bridge, "link", "set", port, "master", "br0", "up")
            self.ip("-n", ns, "addr", "add", f"{addr}/{SUBNET}", "dev", "eth0")
            self.ip("-n", ns, "link", "set", "eth0", "up")

    def spawn(self, host: str, name: str, *args: str | Path) -> Proc:
        """A long-running process inside `host`'s namespace, its output to NAME.log."""
        path = self.logs / f"{name}.log"
        with path.open("wb") as log:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(host), *map(str, args)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.logs,
            )
        proc = Proc(name, popen, LogFile(path))
        self.procs.append(proc)
        return proc

    def run(
        self, host: str, *args: str | Path, expect: int = 0, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["ip", "netns", "exec", self.ns(host), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.logs,
        )
        assert done.returncode == expect, (
            f"{' '.join(map(str, args))} in {host}: exit {done.returncode}, expected {expect}\n"
            f"{done.stdout}{done.stderr}"
        )
        return done

    def stop_processes(self) -> None:
        """Stop the processes we started here (SIGTERM, then SIGKILL), newest first."""
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
                try:
                    proc.popen.wait(10)
                except subprocess.TimeoutExpired:
                    proc.popen.kill()
                    proc.popen.wait(5)

    def destroy(self) -> list[str]:
        """Stop our processes, delete our namespaces; return the names still present."""
        self.stop_processes()
        for ns in reversed(self.namespaces):
            # A process left in the namespace would keep it alive after its name is gone;
            # only our own processes can be in a namespace named after this run.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [ns for ns in self.namespaces if re.search(rf"^{re.escape(ns)}\b", listed, re.M)]


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Network]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    network = Network(f"meshid-{os.getpid()}", tmp_path)
    try:
        network.create({"auth": CA_ADDR, "web": WEB_ADDR, "api": API_ADDR})
        yield network
    finally:
        left = network.destroy()
    assert not left, f"network namespaces left behind: {left}"


# -- the mesh on top of it ---------------------------------------------------------


def sidecar_config(
    name: str,
    *,
    inbound: tuple[str, str] | None = None,
    outbound: Sequence[tuple[str, str, str]] = (),
) -> str:
    lines = [
        f'identity = "{name}"',
        f'trust_domain = "{TD}"',
        "[authority]",
        f'server = "{CA_LISTEN}"',
        'bundle = "bundle.pem"',
        f'token_file = "{name}.token"',
        f'state_dir = "{name}-state"',
        "[limits]",
        'drain_timeout = "3s"',
    ]
    if inbound is not None:
        lines += [
            "[inbound]",
            f'listen = "{inbound[0]}"',
            f'forward = "{inbound[1]}"',
            "proxy_protocol = true",
        ]
    for identity, listen, upstream in outbound:
        lines += [
            "[[outbound]]",
            f'listen = "{listen}"',
            f'upstream = "{upstream}"',
            f'identity = "{identity}"',
        ]
    return "\n".join(lines) + "\n"


def start_sidecar(net: Network, host: str, name: str, config: str, watch: list[Proc]) -> Proc:
    """Enroll `name` from a fresh one-time token and run its sidecar in `host`'s namespace."""
    token = net.run("auth", MESHID, "ca", "token", "--state", "ca", name).stdout.strip()
    (net.logs / f"{name}.token").write_text(token + "\n")
    (net.logs / f"{name}.toml").write_text(config)
    proc = net.spawn(host, name, MESHID, "sidecar", "run", "--config", f"{name}.toml")
    watch.append(proc)
    wait_for(f"'started' from {name}'s sidecar", lambda: proc.log.first("started"), 20, watch)
    assert proc.log.first("credentials", how="enrolled", spiffe_id=sid(name))
    return proc


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_allowed_refused_and_renewed_across_hosts(net: Network) -> None:
    net.run(
        "auth", MESHID, "ca", "init", "--state", "ca", "--trust-domain", TD, "--svid-ttl", "30s"
    )
    bundle = net.run("auth", MESHID, "ca", "bundle", "--state", "ca").stdout
    (net.logs / "bundle.pem").write_text(bundle)
    ca = net.spawn(
        "auth", "ca", MESHID, "ca", "serve", "--state", "ca", "--listen", CA_LISTEN, "--ip", CA_ADDR
    )
    watch = [ca]
    serving = wait_for(
        "'serving' from the control plane", lambda: ca.log.first("serving"), 20, watch
    )
    assert serving["listen"] == CA_LISTEN

    app = net.spawn("api", "backend", sys.executable, APPS, "backend", "127.0.0.1:8080")
    watch.append(app)
    wait_for("the api app listening", lambda: "listening" in app.log.lines(), 20, watch)

    api = start_sidecar(
        net,
        "api",
        "api",
        sidecar_config("api", inbound=(API_INBOUND, "127.0.0.1:8080")),
        watch,
    )
    web = start_sidecar(
        net,
        "web",
        "web",
        sidecar_config("web", outbound=[("api", "127.0.0.1:15002", API_INBOUND)]),
        watch,
    )
    # a second workload on the web host, never allowed to reach api
    batch = start_sidecar(
        net,
        "web",
        "batch",
        sidecar_config("batch", outbound=[("api", "127.0.0.1:15012", API_INBOUND)]),
        watch,
    )
    net.run("auth", MESHID, "policy", "allow", "web", "api", "--state", "ca")
    for proc in (api, web):  # batch's feed holds only its own pairs: none
        wait_for(
            f"the allow-list at {proc.name}'s sidecar",
            functools.partial(proc.log.first, "policy", pairs=1),
            10,
            watch,
        )

    # Allowed: web's app -> web's sidecar -> 198.18.0.3 -> api's sidecar -> the api app.
    answer = net.run("web", sys.executable, APPS, "get", "127.0.0.1:15002").stdout
    assert re.fullmatch(rf"caller={sid('web')} src={re.escape(WEB_ADDR)}:\d+\n", answer), answer
    allowed = wait_for(
        "allow decision at api's sidecar",
        lambda: api.log.first("decision", decision="allow", peer_id=sid("web")),
        5,
        watch,
    )
    assert allowed["direction"] == "inbound"
    assert allowed["peer_addr"].startswith(f"{WEB_ADDR}:")
    assert web.log.first("decision", decision="allow", direction="outbound", peer_id=sid("api"))

    # Refused at the source: batch's own sidecar will not reach api (default deny).
    refused = net.run("web", sys.executable, APPS, "get", "127.0.0.1:15012", expect=3).stdout
    assert refused.startswith("refused:"), refused
    local = wait_for(
        "deny decision at batch's sidecar",
        lambda: batch.log.first("decision", decision="deny", peer_id=sid("api")),
        5,
        watch,
    )
    assert local["reason"] == "not_allowed"

    # Refused across the network: batch skips its sidecar and shows its SVID to api's.
    state = net.logs / "batch-state"
    refused = net.run(
        "web",
        sys.executable,
        APPS,
        "get",
        API_INBOUND,
        "--cert",
        state / "svid.pem",
        "--key",
        state / "svid.key",
        "--bundle",
        net.logs / "bundle.pem",
        expect=3,
    ).stdout
    assert refused.startswith("refused:"), refused
    remote = wait_for(
        "deny decision for batch at api's sidecar",
        lambda: api.log.first("decision", decision="deny", peer_id=sid("batch")),
        5,
        watch,
    )
    assert remote["reason"] == "not_allowed"
    assert remote["peer_addr"].startswith(f"{WEB_ADDR}:")
    served = [line for line in app.log.lines() if line.startswith("served ")]
    assert served == [f"served {answer.strip()}"], "a refused connection reached the api app"

    # Renewal at half-life: both ends get a new serial, and the next call uses it.
    renewed = {}
    for proc in (web, api):
        enrolled = proc.log.first("credentials", how="enrolled")
        assert enrolled is not None
        new = wait_for(
            f"'renewed' from {proc.name}'s sidecar",
            functools.partial(proc.log.first, "credentials", how="renewed"),
            30,
            watch,
        )
        assert new["serial"] != enrolled["serial"]
        renewed[proc.name] = new["serial"]
    answer = net.run("web", sys.executable, APPS, "get", "127.0.0.1:15002").stdout
    assert answer.startswith(f"caller={sid('web')} src={WEB_ADDR}:"), answer
    wait_for(
        "api's sidecar seeing web's renewed certificate",
        lambda: api.log.first("decision", decision="allow", peer_serial=renewed["web"]),
        5,
        watch,
    )
    wait_for(
        "web's sidecar seeing api's renewed certificate",
        lambda: web.log.first("decision", decision="allow", peer_serial=renewed["api"]),
        5,
        watch,
    )

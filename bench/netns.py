"""Hosts for the transparent-interception bench: network namespaces the bench makes and removes.

Topology, every namespace named after the bench's pid (`meshid-bench-<pid>-…`):

    …-auth  198.18.0.1   meshid ca serve --listen 198.18.0.1:8443
    …-web   198.18.0.2   web's sidecar ([transparent] and one explicit
                         [[outbound]] on 127.0.0.1:15002 to 198.18.0.3:8080),
                         and the load generator
    …-api   198.18.0.3   api's sidecar ([transparent], app_ports = [8080]),
                         nginx on 0.0.0.0:8080
    …-br    (no address) br0, with one veth per host

Both hosts run `meshid sidecar redirect --apply`. The two paths under test
share everything but web's outbound side: the transparent one is the
unchanged client asking 198.18.0.3:8080, captured by nftables and routed by
`SO_ORIGINAL_DST` and the address map; the explicit one is the same client
asking 127.0.0.1:15002. Both reach api's captured inbound port.

The root namespace gains no interface, route or address. Leaving the block
stops every process started here (by pid, through the `Supervisor`) and
deletes the namespaces, which takes the veths, the bridge and the nftables
tables with them.
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
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import BenchError, Proc, Supervisor, listening_ports, wait_until

TRUST_DOMAIN = "bench.test"
HOSTS = {"auth": "198.18.0.1", "web": "198.18.0.2", "api": "198.18.0.3"}
SUBNET = 24
CA_LISTEN = f"{HOSTS['auth']}:8443"
APP_PORT = 8080
APP = f"{HOSTS['api']}:{APP_PORT}"
EXPLICIT_PORT = 15002  # web's explicit outbound listener, on web's loopback
CLI_TIMEOUT = 60.0
READY_TIMEOUT = 30.0


def nft_path() -> str | None:
    return shutil.which("nft") or next(
        (p for p in ("/usr/sbin/nft", "/sbin/nft") if Path(p).is_file()), None
    )


def unavailable() -> str | None:
    """Why this machine cannot run the transparent bench (one line), or None when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and nftables need root"
    if shutil.which("ip") is None:
        return "no 'ip' command (Debian package iproute2)"
    if nft_path() is None:
        return "no 'nft' command (Debian package nftables)"
    probe = f"meshid-bench-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise BenchError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Hosts:
    """The namespaces: created by `create`, removed (with whatever is left in them) by `destroy`."""

    tag: str
    namespaces: list[str] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def exec(self, host: str, *argv: str | Path) -> list[str]:
        """argv run inside `host` (`ip netns exec` execs it: the pid is the command's own)."""
        return ["ip", "netns", "exec", self.ns(host), *map(str, argv)]

    def _add(self, host: str) -> str:
        name = self.ns(host)
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def create(self) -> None:
        bridge = self._add("br")
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge, "link", "set", "br0", "up")
        for host, addr in HOSTS.items():
            ns = self._add(host)
            port = f"v-{host}"
            _ip("-n", bridge, "link", "add", port, "type", "veth", "peer", "eth0", "netns", ns)
            _ip("-n", bridge, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/{SUBNET}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def destroy(self) -> list[str]:
        """Delete our namespaces; returns the names still present afterwards."""
        for ns in reversed(self.namespaces):
            # Only our own processes can be in a namespace named after this run; one
            # left behind would keep the namespace alive after its name is gone.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [ns for ns in self.namespaces if re.search(rf"^{re.escape(ns)}\b", listed, re.M)]


def events(log: Path, event: str, **match: object) -> list[dict[str, object]]:
    """The JSON lines of a process's log with this event and these fields."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(record, dict)
            and record.get("event") == event
            and all(record.get(k) == v for k, v in match.items())
        ):
            out.append(record)
    return out


def _listening(proc: Proc, port: int) -> Callable[[], bool]:
    """Whether `port` listens in `proc`'s namespace (its own /proc/PID/net/tcp)."""
    return lambda: port in listening_ports(proc.pid)


@dataclass
class Mesh:
    """The running hosts: where the load generator runs, and the processes whose CPU counts."""

    hosts: Hosts
    web: Proc
    api: Proc
    app: Proc
    commands: list[str]

    def client(self) -> tuple[str, ...]:
        """The prefix that runs a load generator on web's host."""
        return ("ip", "netns", "exec", self.hosts.ns("web"))


def _sidecar_config(name: str, d: Path, transparent: str, extra: str = "") -> str:
    return (
        f'identity = "{name}"\ntrust_domain = "{TRUST_DOMAIN}"\n'
        f'[authority]\nserver = "{CA_LISTEN}"\nbundle = "{d}/bundle.pem"\n'
        f'token_file = "{d}/{name}.token"\nstate_dir = "{d}/{name}-state"\n'
        f"{extra}[transparent]\n{transparent}"
    )


@contextlib.contextmanager
def mesh(sup: Supervisor, workdir: Path, meshid: Path, app_argv: Sequence[str]) -> Iterator[Mesh]:
    """The three hosts with the authority, both sidecars and the app; all gone on exit.

    `app_argv` starts the app on api's host, listening on 0.0.0.0:8080.
    """
    d = Path(tempfile.mkdtemp(prefix="transparent-", dir=workdir))  # a fresh authority each time
    hosts = Hosts(f"meshid-bench-{os.getpid()}")
    started: list[Proc] = []
    commands: list[str] = []

    def cli(host: str | None, *args: str | Path) -> str:
        argv = [str(meshid), *map(str, args)]
        if host is not None:
            argv = hosts.exec(host, *argv)
        if " ".join(argv) not in commands:  # a command polled until it answers is listed once
            commands.append(" ".join(argv))
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=d)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(argv)}: {(done.stderr or done.stdout).strip()[:300]}")
        return done.stdout

    def spawn(host: str, name: str, *argv: str | Path) -> Proc:
        full = hosts.exec(host, *argv)
        commands.append(" ".join(full))
        proc = sup.start(name, full, cwd=d)
        started.append(proc)
        return proc

    def sidecar(host: str, name: str, config: str) -> Proc:
        token = d / f"{name}.token"
        token.touch(mode=0o600)  # a one-time secret, in a directory of mode 0700 besides
        token.write_text(cli(None, "ca", "token", "--state", "ca", name))
        (d / f"{name}.toml").write_text(config)
        proc = spawn(
            host, f"netns-meshid-{name}", meshid, "sidecar", "run", "--config", f"{name}.toml"
        )
        wait_until(f"'started' from {name}'s sidecar", lambda: events(proc.log, "started"), started)
        cli(host, "sidecar", "redirect", "--config", f"{name}.toml", "--apply")
        return proc

    try:
        hosts.create()
        cli(None, "ca", "init", "--state", "ca", "--trust-domain", TRUST_DOMAIN)
        (d / "bundle.pem").write_text(cli(None, "ca", "bundle", "--state", "ca"))
        ca = spawn(
            "auth", "netns-meshid-ca", meshid, "ca", "serve", "--state", "ca",
            "--listen", CA_LISTEN, "--ip", HOSTS["auth"],
        )  # fmt: skip
        wait_until("the authority listening", _listening(ca, 8443), started, READY_TIMEOUT)
        app = spawn("api", "netns-nginx", *app_argv)
        wait_until("the app listening", _listening(app, APP_PORT), started, READY_TIMEOUT)
        api = sidecar(
            "api",
            "api",
            _sidecar_config("api", d, f'app_ports = [{APP_PORT}]\nadvertise = ["{APP}"]\n'),
        )
        explicit = (
            f'[[outbound]]\nlisten = "127.0.0.1:{EXPLICIT_PORT}"\n'
            f'upstream = "{APP}"\nidentity = "api"\n'
        )
        web = sidecar("web", "web", _sidecar_config("web", d, "", explicit))
        wait_until(
            "api's advertised address in the map",
            lambda: APP in cli(None, "service", "list", "--state", "ca"),
            started,
            READY_TIMEOUT,
        )
        out = cli(None, "policy", "allow", "web", "api", "--state", "ca")
        found = re.search(r"policy version (\d+)", out)
        if found is None:
            raise BenchError(f"policy allow said: {out.strip()[:200]}")
        version = int(found.group(1))
        for proc in (api, web):  # the address map comes with the policy
            wait_until(
                f"policy {version} at {proc.name}",
                functools.partial(events, proc.log, "policy", version=version),
                started,
                READY_TIMEOUT,
            )
        yield Mesh(hosts, web, api, app, commands)
    finally:
        for proc in reversed(started):
            sup.stop(proc)
        left = hosts.destroy()
        if left:
            raise BenchError(f"network namespaces left behind: {left}")


@dataclass
class Shared:
    """One `mesh` for every chain that uses it: made by the first, removed with the last."""

    make: Callable[[], contextlib.AbstractContextManager[Mesh]]
    users: int = 0
    current: Mesh | None = None
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @contextlib.contextmanager
    def use(self) -> Iterator[Mesh]:
        if self.current is None:
            self.current = self.stack.enter_context(self.make())
        self.users += 1
        try:
            yield self.current
        finally:
            self.users -= 1
            if self.users == 0:
                self.current = None
                self.stack.close()

"""What is measured: certificates, backends, and the chains (three of them on 127.0.0.1).

A *chain* carries each backend service (``http`` → nginx, ``iperf`` →
iperf3) from a front port to the backend:

- ``direct``: the front port is the backend's port (client → backend);
- ``meshid``: client → web's outbound sidecar → api's inbound sidecar →
  backend, two real ``meshid sidecar run --config`` processes in static mode;
- ``stunnel``: client → stunnel (client mode) → stunnel (server mode, mutual
  TLS) → backend, with the same P-256 SVIDs, TLS 1.3 only.

Two more chains measure transparent interception (`bench.netns`), on hosts
in network namespaces that both share: ``transparent`` (an unchanged client
asking the peer's real address, captured by nftables) and ``explicit`` (the
same client pointed at the outbound sidecar's explicit listener).

`TOPOLOGIES` maps a name to a context manager that starts the chain and stops
exactly its own processes. A new kind of system under test (say the
authority's API, ``meshid ca serve``) is one more entry: a function that
yields a `Chain` whose `ports` name what the workload connects to and whose
`python` lists the roles py-spy should profile.
"""

from __future__ import annotations

import calendar
import contextlib
import functools
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import netns
from bench.netns import Shared
from bench.procs import Proc, Supervisor, free_ports, wait_listening

TRUST_DOMAIN = "bench.test"
SERVICES = ("http", "iperf")


@dataclass
class Env:
    """What every topology shares: the work directory, tools, certificates, backends."""

    workdir: Path
    meshid: Path  # the console script in the venv
    python: Path
    sup: Supervisor
    backends: dict[str, int] = field(default_factory=dict)  # service -> backend port
    backend_procs: dict[str, Proc] = field(default_factory=dict)
    # What the chains of several topologies share (the hosts of the transparent bench).
    shared: dict[str, Shared] = field(default_factory=dict)

    def certs(self, name: str) -> Path:
        return self.workdir / "certs" / name


@dataclass
class Chain:
    """A running system under test."""

    kind: str
    ports: dict[str, int]  # service -> the port a client connects to
    procs: dict[str, Proc] = field(default_factory=dict)  # role -> process (proxies only)
    python: tuple[str, ...] = ()  # roles that are Python processes, for py-spy
    commands: list[str] = field(default_factory=list)  # how it was started, for the report
    host: str = "127.0.0.1"  # the address a client connects to
    client: tuple[str, ...] = ()  # a prefix that runs the client where it must run
    own_backends: dict[str, Proc] | None = None  # backends of its own, instead of Env's
    state: Path | None = None  # an authority chain: the (first) instance's state directory
    database_pid: int | None = None  # an authority chain on PostgreSQL: its server's pid
    event_logs: dict[str, Path] = field(default_factory=dict)  # process name -> decision log


def make_certs(env: Env) -> list[str]:
    """An authority and SVIDs for `web` and `api` through the meshid CLI. Returns the commands."""
    state = env.workdir / "certs" / "ca"
    cmds = [
        [str(env.meshid), "ca", "init", "--state", str(state), "--trust-domain", TRUST_DOMAIN],
        *[
            [
                *(str(env.meshid), "ca", "issue", "--state", str(state), name),
                *("--out", str(env.certs(name)), "--ttl", "24h"),
            ]
            for name in ("web", "api")
        ],
    ]
    for cmd in cmds:
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    (env.workdir / "certs" / "policy.toml").write_text('[[allow]]\nfrom = "web"\nto = "api"\n')
    return [" ".join(c).replace(str(env.workdir), "$WORK") for c in cmds]


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 60000;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 30000; multi_accept on; }}
http {{
    access_log off;
    keepalive_timeout 600s;
    keepalive_requests 10000000;
    client_header_timeout 600s;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    server {{
        listen {host}:{port} backlog=4096;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def start_backends(env: Env) -> list[str]:
    """nginx (one process, `return 200`) and an iperf3 server. Returns the commands."""
    http, iperf = free_ports(2)
    ndir = env.workdir / "nginx"
    (ndir / "tmp").mkdir(parents=True, exist_ok=True)
    conf = ndir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=ndir, host="127.0.0.1", port=http))
    nginx = ["nginx", "-p", str(ndir), "-e", str(ndir / "error.log"), "-c", str(conf)]
    iperf3 = ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf)]
    env.backend_procs["nginx"] = env.sup.start("nginx", nginx)
    env.backend_procs["iperf3"] = env.sup.start("iperf3-server", iperf3)
    wait_listening(list(env.backend_procs.values()), [http, iperf])
    env.backends = {"http": http, "iperf": iperf}
    return [" ".join(nginx), " ".join(iperf3)]


@contextlib.contextmanager
def direct(env: Env) -> Iterator[Chain]:
    yield Chain("direct", dict(env.backends))


def _sidecar_configs(env: Env, front: dict[str, int], middle: dict[str, int]) -> tuple[Path, Path]:
    d = env.workdir / "meshid"
    d.mkdir(exist_ok=True)
    certs = env.workdir / "certs"
    web_admin, api_admin = free_ports(2)

    def static(name: str) -> str:
        return (
            f'[static]\ncert = "{certs / name}/svid.pem"\nkey = "{certs / name}/svid.key"\n'
            f'bundle = "{certs / name}/bundle.pem"\npolicy = "{certs}/policy.toml"\n'
        )

    web = f'identity = "web"\ntrust_domain = "{TRUST_DOMAIN}"\n' + static("web")
    for svc in SERVICES:
        web += (
            f'\n[[outbound]]\nlisten = "127.0.0.1:{front[svc]}"\n'
            f'upstream = "127.0.0.1:{middle[svc]}"\nidentity = "api"\n'
        )
    web += f'\n[admin]\nlisten = "127.0.0.1:{web_admin}"\n\n[log]\nfile = "{d}/web-events.log"\n'
    api = f'identity = "api"\ntrust_domain = "{TRUST_DOMAIN}"\n' + static("api")
    for svc in SERVICES:
        api += (
            f'\n[[inbound]]\nlisten = "127.0.0.1:{middle[svc]}"\n'
            f'forward = "127.0.0.1:{env.backends[svc]}"\n'
        )
    api += f'\n[admin]\nlisten = "127.0.0.1:{api_admin}"\n\n[log]\nfile = "{d}/api-events.log"\n'
    (d / "web.toml").write_text(web)
    (d / "api.toml").write_text(api)
    return d / "web.toml", d / "api.toml"


@contextlib.contextmanager
def meshid(env: Env) -> Iterator[Chain]:
    ports = free_ports(2 * len(SERVICES))
    front = dict(zip(SERVICES, ports[: len(SERVICES)], strict=True))
    middle = dict(zip(SERVICES, ports[len(SERVICES) :], strict=True))
    web_conf, api_conf = _sidecar_configs(env, front, middle)
    api_cmd = [str(env.meshid), "sidecar", "run", "--config", str(api_conf)]
    web_cmd = [str(env.meshid), "sidecar", "run", "--config", str(web_conf)]
    started: list[Proc] = []
    try:
        started.append(env.sup.start("meshid-api", api_cmd))
        started.append(env.sup.start("meshid-web", web_cmd))
        wait_listening(started, ports)
        yield Chain(
            "meshid",
            front,
            {"web sidecar": started[1], "api sidecar": started[0]},
            python=("web sidecar", "api sidecar"),
            commands=[" ".join(api_cmd), " ".join(web_cmd)],
            event_logs={
                "meshid-web": web_conf.parent / "web-events.log",
                "meshid-api": api_conf.parent / "api-events.log",
            },
        )
    finally:
        for p in reversed(started):
            env.sup.stop(p)


def _stunnel_conf(env: Env, role: str, routes: dict[str, tuple[int, int]]) -> Path:
    name = "web" if role == "client" else "api"
    c = env.certs(name)
    d = env.workdir / "stunnel"
    d.mkdir(exist_ok=True)
    text = f"foreground = yes\npid =\nsyslog = no\noutput = {d}/{role}.events.log\n"
    for svc, (accept, connect) in routes.items():
        text += (
            f"\n[{svc}]\naccept = 127.0.0.1:{accept}\nconnect = 127.0.0.1:{connect}\n"
            f"cert = {c}/svid.pem\nkey = {c}/svid.key\nCAfile = {c}/bundle.pem\n"
            "verifyChain = yes\nsslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\n"
        )
        text += "client = yes\n" if role == "client" else "requireCert = yes\n"
    path = d / f"{role}.conf"
    path.write_text(text)
    return path


@contextlib.contextmanager
def stunnel(env: Env) -> Iterator[Chain]:
    ports = free_ports(2 * len(SERVICES))
    front = dict(zip(SERVICES, ports[: len(SERVICES)], strict=True))
    middle = dict(zip(SERVICES, ports[len(SERVICES) :], strict=True))
    server_conf = _stunnel_conf(env, "server", {s: (middle[s], env.backends[s]) for s in SERVICES})
    client_conf = _stunnel_conf(env, "client", {s: (front[s], middle[s]) for s in SERVICES})
    started: list[Proc] = []
    try:
        started.append(env.sup.start("stunnel-server", ["stunnel4", str(server_conf)]))
        started.append(env.sup.start("stunnel-client", ["stunnel4", str(client_conf)]))
        wait_listening(started, ports)
        yield Chain(
            "stunnel",
            front,
            {"client stunnel": started[1], "server stunnel": started[0]},
            commands=[f"stunnel4 {server_conf}", f"stunnel4 {client_conf}"],
        )
    finally:
        for p in reversed(started):
            env.sup.stop(p)


@contextlib.contextmanager
def authority(env: Env) -> Iterator[Chain]:
    """`meshid ca serve` with one worker per core, on a fresh authority."""
    state = env.workdir / "ca-bench" / "ca"
    if not state.exists():
        init = [
            str(env.meshid),
            "ca",
            "init",
            "--state",
            str(state),
            "--trust-domain",
            "bench.example",
        ]
        subprocess.run(init, check=True, capture_output=True)
    (port,) = free_ports(1)
    cmd = [
        str(env.meshid),
        "ca",
        "serve",
        "--state",
        str(state),
        "--listen",
        f"127.0.0.1:{port}",
        "--workers",
        str(CA_WORKERS),
    ]
    proc = env.sup.start("meshid-ca", cmd)
    try:
        wait_listening([proc], [port])
        yield Chain(
            "ca",
            {"ca": port},
            {"authority": proc},
            python=("authority",),
            commands=[" ".join(cmd)],
            state=state,
        )
    finally:
        env.sup.stop(proc)


@contextlib.contextmanager
def pg_authority(env: Env, instances: int) -> Iterator[Chain]:
    """`instances` x `meshid ca serve` of one trust domain on a throwaway PostgreSQL server.

    The cluster is the tests' (tests/ca/pg_cluster.py: Unix socket only, no
    durability, so the figure is the authority's cost, not a disk's). The
    workers are shared out so that every topology runs CA_WORKERS processes:
    on one machine a second instance brings no CPU of its own, so the figure
    shows what sharing the trust domain costs, not how it scales across hosts.
    """
    from tests.ca.pg_cluster import running_cluster

    kind = f"ca-pg{instances}"
    root = env.workdir / "ca-bench" / kind
    workers = max(1, CA_WORKERS // instances)
    with running_cluster() as cluster:
        url = cluster.url(cluster.create_database())
        states = [root / f"instance-{i + 1}" for i in range(instances)]
        setup = [
            [*(str(env.meshid), "ca", "init", "--state", str(states[0])),
             *("--trust-domain", "bench.example", "--database", url, "--instance", "i1")],
            *[
                [*(str(env.meshid), "ca", "join", "--state", str(state), "--database", url),
                 *("--instance", f"i{i + 2}", "--audit-key", str(states[0] / "audit.key")),
                 *("--propagation", "1s")]
                for i, state in enumerate(states[1:])
            ],
        ]  # fmt: skip
        signs_at = time.time()
        for argv in setup:
            done = subprocess.run(argv, check=True, capture_output=True, text=True)
            if " signs from " in done.stdout:  # `ca join`: its root, and its `ca serve`, wait
                stamp = done.stdout.split(" signs from ", 1)[1].split()[0]
                signs_at = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) + 1
        time.sleep(max(0.0, signs_at - time.time()))  # at most the 1 s given to --propagation
        ports = free_ports(instances)
        cmds = [
            [*(str(env.meshid), "ca", "serve", "--state", str(state)),
             *("--listen", f"127.0.0.1:{port}", "--workers", str(workers))]
            for state, port in zip(states, ports, strict=True)
        ]  # fmt: skip
        procs: dict[str, Proc] = {}
        try:
            for i, cmd in enumerate(cmds):
                procs[f"authority {i + 1}"] = env.sup.start(f"meshid-{kind}-{i + 1}", cmd)
            wait_listening(list(procs.values()), ports)
            yield Chain(
                kind,
                {f"ca{i + 1}": port for i, port in enumerate(ports)},
                procs,
                python=tuple(procs),
                commands=[" ".join(c) for c in [*setup, *cmds]],
                state=states[0],
                database_pid=int((cluster.data / "postmaster.pid").read_text().split()[0]),
            )
        finally:
            for proc in reversed(procs.values()):
                env.sup.stop(proc)


CA_WORKERS = 2  # one per core on the benchmark machine


def _hosts(env: Env) -> Shared:
    """The transparent bench's hosts, with nginx as api's app on 0.0.0.0:8080."""
    shared = env.shared.get("netns")
    if shared is None:
        ndir = env.workdir / "nginx-netns"
        (ndir / "tmp").mkdir(parents=True, exist_ok=True)
        conf = ndir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=ndir, host="0.0.0.0", port=netns.APP_PORT))
        nginx = ["nginx", "-p", str(ndir), "-e", str(ndir / "error.log"), "-c", str(conf)]
        shared = env.shared["netns"] = Shared(
            lambda: netns.mesh(env.sup, env.workdir, env.meshid, nginx)
        )
    return shared


def _netns_chain(env: Env, kind: str, host: str, port: int) -> Iterator[Chain]:
    with _hosts(env).use() as hosts:
        yield Chain(
            kind,
            {"http": port},
            {"web sidecar": hosts.web, "api sidecar": hosts.api},
            # Only the outbound side differs between the two; profile it on the captured path.
            python=("web sidecar",) if kind == "transparent" else (),
            # One set of hosts serves both: its commands are listed once, under transparent.
            commands=hosts.commands if kind == "transparent" else ["(the hosts of transparent)"],
            host=host,
            client=hosts.client(),
            own_backends={"nginx": hosts.app},
        )


@contextlib.contextmanager
def transparent(env: Env) -> Iterator[Chain]:
    """An unchanged client on web's host asking api's real address, captured by nftables."""
    yield from _netns_chain(env, "transparent", netns.HOSTS["api"], netns.APP_PORT)


@contextlib.contextmanager
def explicit(env: Env) -> Iterator[Chain]:
    """The same client and hosts, pointed at web's explicit outbound listener instead."""
    yield from _netns_chain(env, "explicit", "127.0.0.1", netns.EXPLICIT_PORT)


TOPOLOGIES: dict[str, Callable[[Env], contextlib.AbstractContextManager[Chain]]] = {
    "ca": authority,
    "ca-pg1": functools.partial(pg_authority, instances=1),
    "ca-pg2": functools.partial(pg_authority, instances=2),
    "direct": direct,
    "meshid": meshid,
    "stunnel": stunnel,
    "transparent": transparent,
    "explicit": explicit,
}

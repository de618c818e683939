"""What is measured: certificates, backends, and the three chains, all on 127.0.0.1.

A *chain* carries each backend service (``http`` → nginx, ``iperf`` →
iperf3) from a front port to the backend:

- ``direct``: the front port is the backend's port (client → backend);
- ``meshid``: client → web's outbound sidecar → api's inbound sidecar →
  backend, two real ``meshid sidecar run --config`` processes in static mode;
- ``stunnel``: client → stunnel (client mode) → stunnel (server mode, mutual
  TLS) → backend, with the same P-256 SVIDs, TLS 1.3 only.

`TOPOLOGIES` maps a name to a context manager that starts the chain and stops
exactly its own processes. A new kind of system under test (say the
authority's API, ``meshid ca serve``) is one more entry: a function that
yields a `Chain` whose `ports` name what the workload connects to and whose
`python` lists the roles py-spy should profile.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
        listen 127.0.0.1:{port} backlog=4096;
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
    conf.write_text(NGINX_CONF.format(dir=ndir, port=http))
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
            "ca", {"ca": port}, {"authority": proc}, python=("authority",), commands=[" ".join(cmd)]
        )
    finally:
        env.sup.stop(proc)


CA_WORKERS = 2  # one per core on the benchmark machine

TOPOLOGIES: dict[str, Callable[[Env], contextlib.AbstractContextManager[Chain]]] = {
    "ca": authority,
    "direct": direct,
    "meshid": meshid,
    "stunnel": stunnel,
}

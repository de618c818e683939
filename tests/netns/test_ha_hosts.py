"""The highly available authority across hosts: one authority host's link goes down.

Topology, every namespace named after this test run's pid (see test_multihost
for the bridge and the clean-up):

    db     198.18.0.10  PostgreSQL on 198.18.0.10:5432, password auth (scram)
    auth1  198.18.0.1   meshid ca serve, instance `one` (made by ca init --database)
    auth2  198.18.0.2   meshid ca serve, instance `two` (made by ca join)
    web    198.18.0.3   web's sidecar, outbound to api; its client
    api    198.18.0.4   api's sidecar on :15001, the api app on 127.0.0.1:8080

The instances reach the database over TCP with the password from a file
(`--database-password-file`), never on a command line. Both sidecars name
both instances, auth1 first. With `ip link set eth0 down` on auth1, that
host vanishes from the network without a word (no reset, no refusal): the
sidecars must notice by their own timeouts, move to auth2 and renew there,
while requests from web to api go on succeeding throughout.

The SVIDs live 60 s, so renewal comes at about 30 s: the first request to
find auth1 silent waits out the sidecar's 15 s request timeout before it
moves (the others waiting there follow it at once), and with 30 s SVIDs that
would leave a renewal only a second or two to spare.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from tests.ca.pg_cluster import PASSWORD_ROLE, PgCluster, running_cluster
from tests.e2e.harness import signs_from
from tests.netns.test_multihost import (
    APPS,
    MESHID,
    TD,
    Network,
    Proc,
    netns_unavailable,
    sid,
    wait_for,
)

pytestmark = pytest.mark.slow
HOSTS = {
    "db": "198.18.0.10",
    "auth1": "198.18.0.1",
    "auth2": "198.18.0.2",
    "web": "198.18.0.3",
    "api": "198.18.0.4",
}
SERVERS = [f"{HOSTS['auth1']}:8443", f"{HOSTS['auth2']}:8443"]
API_INBOUND = f"{HOSTS['api']}:15001"
WEB_OUTBOUND = "127.0.0.1:15002"
PASSWORD = "pw-netns-5Rr8-never-shown"


@dataclass
class Site:
    net: Network
    pg: PgCluster


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """The five hosts, and PostgreSQL in `db`; all of it stopped and removed afterwards."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    network = Network(f"meshid-{os.getpid()}-ha", tmp_path)
    try:
        network.create(HOSTS)
        with running_cluster(listen=HOSTS["db"], netns=network.ns("db")) as cluster:
            try:
                yield Site(network, cluster)
            finally:  # our processes first, then the server (in its namespace), then the hosts
                network.stop_processes()
    finally:
        left = network.destroy()
    assert not left, f"network namespaces left behind: {left}"


def sidecar_config(name: str, *, inbound: bool) -> str:
    servers = ", ".join(f'"{s}"' for s in SERVERS)
    lines = [
        f'identity = "{name}"',
        f'trust_domain = "{TD}"',
        "[authority]",
        f"server = [{servers}]",
        'bundle = "bundle.pem"',
        f'token_file = "{name}.token"',
        f'state_dir = "{name}-state"',
        "[limits]",
        'drain_timeout = "3s"',
    ]
    if inbound:
        lines += ["[inbound]", f'listen = "{API_INBOUND}"', 'forward = "127.0.0.1:8080"',
                  "proxy_protocol = true"]  # fmt: skip
    else:
        lines += ["[[outbound]]", f'listen = "{WEB_OUTBOUND}"', f'upstream = "{API_INBOUND}"',
                  'identity = "api"']  # fmt: skip
    return "\n".join(lines) + "\n"


def get(net: Network) -> subprocess.CompletedProcess[str]:
    """One request from web's host through both sidecars to the api app."""
    return subprocess.run(
        ["ip", "netns", "exec", net.ns("web"), sys.executable, str(APPS), "get", WEB_OUTBOUND],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=net.logs,
    )


def get_ok(net: Network) -> str:
    """One request from web's host through both sidecars to the api app; it must succeed."""
    done = get(net)
    answer = done.stdout
    assert done.returncode == 0, answer + done.stderr
    assert re.fullmatch(rf"caller={sid('web')} src={re.escape(HOSTS['web'])}:\d+\n", answer)
    return answer


@pytest.mark.timeout(240)
def test_an_authority_host_going_dark_stops_no_traffic(site: Site) -> None:
    net = site.net
    site.pg.set_password(PASSWORD)
    dbname = site.pg.create_database()
    url = f"host={HOSTS['db']} dbname={dbname} user={PASSWORD_ROLE}"
    secret = net.logs / "db.password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    database = ("--database", url, "--database-password-file", str(secret))
    outputs = [
        net.run("auth1", MESHID, "ca", "init", "--state", "ca1", "--trust-domain", TD,
                "--svid-ttl", "60s", *database, "--instance", "one"),
        net.run("auth2", MESHID, "ca", "join", "--state", "ca2", *database, "--instance", "two",
                "--audit-key", "ca1/audit.key", "--propagation", "1s"),
    ]  # fmt: skip
    signs_at = signs_from(outputs[-1].stdout)  # `ca serve` on auth2 may start from then
    bundle = net.run("auth2", MESHID, "ca", "bundle", "--state", "ca2").stdout
    assert bundle.count("BEGIN CERTIFICATE") >= 2  # both instances' roots
    (net.logs / "bundle.pem").write_text(bundle)
    watch: list[Proc] = []
    for host, state, addr in (("auth1", "ca1", SERVERS[0]), ("auth2", "ca2", SERVERS[1])):
        if host == "auth2":
            time.sleep(max(0.0, (signs_at - datetime.now(UTC)).total_seconds()))
        proc = net.spawn(host, host, MESHID, "ca", "serve", "--state", state, "--listen", addr,
                         "--ip", addr.split(":")[0])  # fmt: skip
        watch.append(proc)
        serving = wait_for(f"'serving' from {host}", lambda p=proc: p.log.first("serving"), 30,
                           watch)  # fmt: skip
        assert serving["listen"] == addr
    app = net.spawn("api", "backend", sys.executable, APPS, "backend", "127.0.0.1:8080")
    watch.append(app)
    wait_for("the api app listening", lambda: "listening" in app.log.lines(), 20, watch)

    cars: dict[str, Proc] = {}
    for name in ("api", "web"):
        token = net.run("auth2", MESHID, "ca", "token", "--state", "ca2", name).stdout.strip()
        (net.logs / f"{name}.token").write_text(token + "\n")
        (net.logs / f"{name}.toml").write_text(sidecar_config(name, inbound=name == "api"))
        car = net.spawn(name, name, MESHID, "sidecar", "run", "--config", f"{name}.toml")
        watch.append(car)
        cars[name] = car
        wait_for(f"'started' from {name}", lambda c=car: c.log.first("started"), 30, watch)
    outputs.append(net.run("auth2", MESHID, "policy", "allow", "web", "api", "--state", "ca2"))
    for car in cars.values():
        wait_for(f"the allow-list at {car.name}",
                 functools.partial(car.log.first, "policy", pairs=1), 10, watch)  # fmt: skip
    answers = [get_ok(net)]
    renewed_before = {n: len(c.log.find("credentials", how="renewed")) for n, c in cars.items()}

    # auth1 vanishes: no reset, no refusal, its packets go nowhere
    net.ip("-n", net.ns("auth1"), "link", "set", "eth0", "down")
    down = time.monotonic()

    def moved_and_renewed() -> bool:
        answers.append(get_ok(net))  # every request on the way must succeed
        return all(
            any(m["left"] == SERVERS[0] and m["to"] == SERVERS[1]
                for m in car.log.find("authority_failover"))
            and len(car.log.find("credentials", how="renewed")) > renewed_before[name]
            for name, car in cars.items()
        )  # fmt: skip

    wait_for("both sidecars on auth2, renewed there", moved_and_renewed, 90, watch)
    seconds = time.monotonic() - down
    # the SVID each sidecar holds now was signed by two's root
    for name, car in cars.items():
        serial = car.log.find("credentials")[-1]["serial"]
        with psycopg.connect(site.pg.url(dbname)) as conn:
            signer = conn.execute(
                "SELECT r.instance FROM svids s JOIN roots r USING (generation) "
                "WHERE s.serial = %s",
                (serial,),
            ).fetchall()
        assert signer == [("two",)], (name, serial, signer)

    # a change made on the surviving instance still reaches both sidecars
    outputs.append(net.run("auth2", MESHID, "policy", "deny", "web", "api", "--state", "ca2"))
    wait_for("web refused after the deny", lambda: get(net).returncode == 3, 10, watch)
    assert len(answers) >= 3, f"only {len(answers)} requests in {seconds:.0f}s"

    texts = [o.stdout + o.stderr for o in outputs]
    texts += [p.read_text(errors="replace") for p in net.logs.glob("*.log")]
    assert not [t for t in texts if PASSWORD in t]

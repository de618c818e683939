"""Transparent interception across hosts: an unchanged client, captured at both ends.

Three network namespaces as in test_multihost (authority 198.18.0.1, web
198.18.0.2, api 198.18.0.3). api's app listens on 0.0.0.0:8080; both hosts
run `meshid sidecar redirect --apply` and a sidecar with `[transparent]`.
web's unchanged client asks http://198.18.0.3:8080/ and gets 200, while a
packet capture on api's link shows TLS records and never the request line.
A plaintext client on another host is refused at api's sidecar, an unmapped
destination is refused with `unknown_destination`, and `policy deny` refuses
new connections and cuts a live captured one within 2 s.
Needs root, `ip netns`, `nft` and `tcpdump`.
"""

from __future__ import annotations

import functools
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns.test_multihost import (
    API_ADDR,
    APPS,
    CA_ADDR,
    CA_LISTEN,
    MESHID,
    TD,
    WEB_ADDR,
    LogFile,
    Network,
    Proc,
    net,  # noqa: F401 - the fixture
    sid,
    wait_for,
)

pytestmark = pytest.mark.slow
APP_URL = f"{API_ADDR}:8080"


def config(name: str, transparent: str) -> str:
    return (
        f'identity = "{name}"\ntrust_domain = "{TD}"\n'
        f'[authority]\nserver = "{CA_LISTEN}"\nbundle = "bundle.pem"\n'
        f'token_file = "{name}.token"\nstate_dir = "{name}-state"\n'
        '[limits]\ndrain_timeout = "3s"\n'
        f"[transparent]\n{transparent}"
    )


def start(network: Network, host: str, name: str, text: str, watch: list[Proc]) -> Proc:
    token = network.run("auth", MESHID, "ca", "token", "--state", "ca", name).stdout.strip()
    (network.logs / f"{name}.token").write_text(token + "\n")
    (network.logs / f"{name}.toml").write_text(text)
    proc = network.spawn(host, name, MESHID, "sidecar", "run", "--config", f"{name}.toml")
    watch.append(proc)
    wait_for(f"'started' from {name}'s sidecar", lambda: proc.log.first("started"), 20, watch)
    network.run(host, MESHID, "sidecar", "redirect", "--config", f"{name}.toml", "--apply")
    return proc


def policy_version(network: Network, *args: str) -> int:
    out = network.run("auth", MESHID, *args, "--state", "ca").stdout
    return int(out.rsplit("policy version ", 1)[1].split(")")[0])


@pytest.mark.timeout(120)
def mesh_web_and_api(network: Network, watch: list[Proc]) -> tuple[Proc, Proc]:
    """api's and web's sidecars started, api's address in the map, web -> api allowed at both."""
    api_extra = f'app_ports = [8080]\nadvertise = ["{APP_URL}"]\n'
    api = start(network, "api", "api", config("api", api_extra), watch)
    web = start(network, "web", "web", config("web", ""), watch)
    wait_for(
        "api's advertised address in the map",
        lambda: APP_URL in network.run("auth", MESHID, "service", "list", "--state", "ca").stdout,
        20,
        watch,
    )
    version = policy_version(network, "policy", "allow", "web", "api")
    for proc in (api, web):
        wait_for(
            f"policy {version} at {proc.name}",
            functools.partial(proc.log.first, "policy", version=version),
            10,
            watch,
        )
    return api, web


def test_unchanged_client_is_meshed_across_hosts(net: Network) -> None:  # noqa: F811
    for tool in ("nft", "tcpdump"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"no '{tool}' command; 'make system-packages' installs it")
    net.run("auth", MESHID, "ca", "init", "--state", "ca", "--trust-domain", TD)
    (net.logs / "bundle.pem").write_text(
        net.run("auth", MESHID, "ca", "bundle", "--state", "ca").stdout
    )
    ca = net.spawn(
        "auth", "ca", MESHID, "ca", "serve", "--state", "ca", "--listen", CA_LISTEN, "--ip", CA_ADDR
    )
    watch = [ca]
    wait_for("'serving' from the control plane", lambda: ca.log.first("serving"), 20, watch)
    app = net.spawn(
        "api", "app", sys.executable, "-u", "-m", "http.server", "8080", "--bind", "0.0.0.0"
    )
    watch.append(app)
    wait_for("the api app", lambda: any("Serving HTTP" in x for x in app.log.lines()), 20, watch)

    api, web = mesh_web_and_api(net, watch)

    # The unchanged client, while tcpdump watches api's link.
    dump = net.logs / "link.pcap"
    tcpdump = net.spawn(
        "api", "tcpdump", "tcpdump", "-i", "eth0", "-s", "0", "-U", "-w", dump, "tcp port 8080"
    )
    wait_for("tcpdump listening", lambda: "listening on" in tcpdump.log.path.read_text(), 10)
    answer = net.run("web", sys.executable, APPS, "get", APP_URL)
    assert "Directory listing" in answer.stdout
    wait_for("the packets on disk", lambda: dump.stat().st_size > 24 * 20, 10, [tcpdump])
    tcpdump.popen.send_signal(signal.SIGINT)
    tcpdump.popen.wait(10)
    captured = dump.read_bytes()
    assert b"\x17\x03\x03" in captured, "no TLS application data on the link"
    assert b"GET / HTTP" not in captured, "the request line crossed the link in clear"
    allowed = wait_for(
        "the allow decision at web",
        lambda: web.log.first("decision", decision="allow", direction="outbound"),
        5,
        watch,
    )
    assert allowed["upstream"] == APP_URL and allowed["peer_id"] == sid("api")
    assert allowed["original_dst"] == APP_URL
    inbound = api.log.first("decision", decision="allow", peer_id=sid("web"))
    assert inbound is not None and inbound["peer_addr"].startswith(f"{WEB_ADDR}:")
    assert inbound["original_dst"] == APP_URL
    # No routing loop: the sidecar's own upstream connection was not captured again.
    assert len(web.log.find("decision", direction="outbound")) == 1
    assert len(api.log.find("decision", direction="inbound")) == 1

    # A plaintext client on another host reaching api's app port directly is refused.
    refused = net.run("auth", sys.executable, APPS, "get", APP_URL, expect=3).stdout
    assert refused.startswith("refused:"), refused
    plain = wait_for(
        "the plaintext refusal at api",
        lambda: api.log.first("decision", decision="deny", reason="plaintext_http"),
        5,
        watch,
    )
    assert plain["peer_addr"].startswith(f"{CA_ADDR}:")

    # An unmapped destination is refused at web's sidecar.
    net.run("web", sys.executable, APPS, "get", f"{CA_ADDR}:9", expect=3)
    wait_for(
        "unknown_destination at web",
        lambda: web.log.first("decision", decision="deny", reason="unknown_destination"),
        5,
        watch,
    )

    # Without the pair, the same request fails and the deny is logged.
    version = policy_version(net, "policy", "deny", "web", "api")
    wait_for("policy at web", functools.partial(web.log.first, "policy", version=version), 10)
    net.run("web", sys.executable, APPS, "get", APP_URL, expect=3)
    denied = wait_for(
        "the deny at web",
        lambda: web.log.first("decision", decision="deny", reason="not_allowed"),
        5,
        watch,
    )
    assert denied["direction"] == "outbound"


@pytest.mark.timeout(60)
def test_passthrough_to_an_unmeshed_destination(net: Network) -> None:  # noqa: F811
    """With `unknown_destination = "passthrough"` an unmapped address is reached in plain TCP."""
    if shutil.which("nft") is None and not Path("/usr/sbin/nft").exists():
        pytest.skip("no 'nft' command; 'make system-packages' installs it")
    net.run("auth", MESHID, "ca", "init", "--state", "ca", "--trust-domain", TD)
    net.run("auth", MESHID, "ca", "issue", "--state", "ca", "web", "--out", "web-files")
    (net.logs / "web.toml").write_text(
        f'identity = "web"\ntrust_domain = "{TD}"\n'
        '[static]\ncert = "web-files/svid.pem"\nkey = "web-files/svid.key"\n'
        'bundle = "web-files/bundle.pem"\n'
        '[log]\nfile = "web-events.jsonl"\n'
        '[transparent]\nunknown_destination = "passthrough"\n'
    )
    outside = net.spawn(
        "auth", "plain", sys.executable, "-u", "-m", "http.server", "8081", "--bind", CA_ADDR
    )
    watch = [outside]
    wait_for("the plain server", lambda: any("Serving HTTP" in x for x in outside.log.lines()), 20)
    web = net.spawn("web", "web", MESHID, "sidecar", "run", "--config", "web.toml")
    watch.append(web)
    events = LogFile(net.logs / "web-events.jsonl")
    wait_for("'started' from web's sidecar", lambda: events.first("started"), 20, watch)
    net.run("web", MESHID, "sidecar", "redirect", "--config", "web.toml", "--apply")

    answer = net.run("web", sys.executable, APPS, "get", f"{CA_ADDR}:8081")
    assert "Directory listing" in answer.stdout
    passed = wait_for(
        "the passthrough decision",
        lambda: events.first("decision", decision="passthrough"),
        5,
        watch,
    )
    assert passed["original_dst"] == f"{CA_ADDR}:8081"
    assert passed["reason"] == "unknown_destination"
    assert len(events.find("decision")) == 1  # the sidecar's own connection was not captured
    served = [x for x in outside.log.lines() if '"GET / HTTP' in x]
    assert len(served) == 1 and served[0].startswith(WEB_ADDR), served

    # IPv6: the original destination of a captured IPv6 connection is recovered too.
    for host, addr in (("auth", "2001:db8::1"), ("web", "2001:db8::2")):
        net.ip("-n", net.ns(host), "addr", "add", f"{addr}/64", "dev", "eth0", "nodad")
    outside6 = net.spawn(
        "auth", "plain6", sys.executable, "-u", "-m", "http.server", "8082", "--bind", "2001:db8::1"
    )
    wait_for("the IPv6 server", lambda: any("Serving HTTP" in x for x in outside6.log.lines()), 20)
    fetch = "import urllib.request as u; print(u.urlopen('http://[2001:db8::1]:8082/').status)"
    assert net.run("web", sys.executable, "-c", fetch).stdout == "200\n"
    passed6 = wait_for(
        "the IPv6 passthrough decision",
        lambda: events.first("decision", original_dst="[2001:db8::1]:8082"),
        5,
        watch,
    )
    assert passed6["decision"] == "passthrough"


@pytest.mark.alone  # asserts a cut within 2 s of the deny, not on a crowded machine
@pytest.mark.timeout(120)
def test_policy_deny_cuts_a_live_captured_connection_across_hosts(net: Network) -> None:  # noqa: F811
    """A captured connection carrying data is cut within 2 s of `policy deny` on the authority."""
    if shutil.which("nft") is None and not Path("/usr/sbin/nft").exists():
        pytest.skip("no 'nft' command; 'make system-packages' installs it")
    net.run("auth", MESHID, "ca", "init", "--state", "ca", "--trust-domain", TD)
    (net.logs / "bundle.pem").write_text(
        net.run("auth", MESHID, "ca", "bundle", "--state", "ca").stdout
    )
    ca = net.spawn(
        "auth", "ca", MESHID, "ca", "serve", "--state", "ca", "--listen", CA_LISTEN, "--ip", CA_ADDR
    )
    watch = [ca]
    wait_for("'serving' from the control plane", lambda: ca.log.first("serving"), 20, watch)
    app = net.spawn("api", "echo", sys.executable, "-u", APPS, "echo", "0.0.0.0:8080")
    watch.append(app)
    wait_for("the api app listening", lambda: "listening" in app.log.lines(), 20, watch)
    api, web = mesh_web_and_api(net, watch)

    # web's unchanged client holds one connection to api's real address, fed from its stdin.
    log = net.logs / "client.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            ["ip", "netns", "exec", net.ns("web"), sys.executable, "-u", APPS, "hold", APP_URL],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=out,
            cwd=net.logs,
        )
    client = Proc("client", popen, LogFile(log))
    net.procs.append(client)
    assert popen.stdin is not None
    with popen.stdin as feed:  # closed however the test ends
        wait_for("the client connected", lambda: "connected" in client.log.lines(), 10, [client])
        for n in (1, 2):
            feed.write(f"ping {n}\n".encode())
            feed.flush()
            wait_for(f"echo {n}", lambda n=n: f"echo ping {n}" in client.log.lines(), 10, [client])
        allowed = wait_for(
            "the allow decision at web",
            lambda: web.log.first("decision", decision="allow", direction="outbound"),
            5,
            watch,
        )
        assert allowed["original_dst"] == APP_URL and allowed["peer_id"] == sid("api")
        assert not [x for x in client.log.lines() if x.startswith("cut:")]

        net.run("auth", MESHID, "policy", "deny", "web", "api", "--state", "ca")
        denied_at = time.monotonic()  # the pair is gone from the authority's store
        wait_for(
            "the cut at the client",
            lambda: [x for x in client.log.lines() if x.startswith("cut:")],
            2.0,
        )
        elapsed = time.monotonic() - denied_at
        assert elapsed <= 2.0, f"cut {elapsed:.2f}s after the deny"
        assert popen.wait(5) == 0
    # Whichever sidecar heard the deny first cut it, naming where the app was going.
    cuts = wait_for(
        "the cut in a sidecar's log",
        lambda: [
            *web.log.find("close", reason="policy_revoked"),
            *api.log.find("close", reason="policy_revoked"),
        ],
        5,
        watch,
    )
    assert [c["original_dst"] for c in cuts] == [APP_URL] * len(cuts)
    assert {c["peer_id"] for c in cuts} <= {sid("web"), sid("api")}

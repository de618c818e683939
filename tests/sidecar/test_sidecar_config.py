"""Config validation: every value is checked at load time, with an error naming its key.

A value that parses but cannot work (a NaN timeout, a server name no TLS
library can encode) must be refused here, not discovered by the first
connection that uses it.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from meshid.errors import ConfigError
from sidecar.config import Address, AuthoritySource, StaticSource, parse_config, valid_hostname
from sidecar.failover import MAX_SERVERS


def _doc(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "identity": "web",
        "trust_domain": "example.org",
        "static": {"cert": "c.pem", "key": "k.pem", "bundle": "b.pem"},
        "outbound": [{"listen": "127.0.0.1:0", "upstream": "api.internal:8443", "identity": "api"}],
    }
    doc.update(extra)
    return doc


def _refused(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    message = info.value.message
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "key",
    [
        "handshake_timeout",
        "idle_timeout",
        "connect_timeout",
        "drain_timeout",
        "clock_skew",
        "quarantine_window",
        "quarantine_period",
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0, 0, 0.0, 1e12, -5])
def test_durations_refuse_nan_inf_negative_zero_and_absurd(key: str, value: float) -> None:
    message = _refused(_doc(limits={key: value}))
    assert message.startswith(f"limits.{key}:")


@pytest.mark.parametrize(
    "key", ["max_connections", "quarantine_failures", "quarantine_address_failures"]
)
@pytest.mark.parametrize("value", [-1, 10**12, 1.5, math.nan, math.inf, True, "7"])
def test_counts_refuse_negative_absurd_and_non_integers(key: str, value: object) -> None:
    message = _refused(_doc(limits={key: value}))
    assert message.startswith(f"limits.{key}:")


def test_good_limits_are_kept() -> None:
    limits = parse_config(
        _doc(
            limits={
                "handshake_timeout": 2.5,
                "idle_timeout": "1h",
                "max_connections": 7,
                "quarantine_failures": 0,
                "quarantine_address_failures": 500,
            }
        )
    ).limits
    assert (limits.handshake_timeout, limits.idle_timeout) == (2.5, 3600.0)
    assert (limits.max_connections, limits.quarantine_failures) == (7, 0)
    assert limits.quarantine_address_failures == 500


def test_max_connections_zero_is_refused() -> None:
    assert _refused(_doc(limits={"max_connections": 0})).startswith("limits.max_connections:")


@pytest.mark.parametrize(
    "name",
    ["bad..name", ".lead", "trail.", "-dash.example", "dash-.example", "a b", "x" * 64, "", "é..x"],
)
def test_server_name_must_be_a_hostname(name: str) -> None:
    doc = _doc()
    doc["outbound"][0]["server_name"] = name
    assert _refused(doc).startswith("outbound[0].server_name:")


@pytest.mark.parametrize("host", ["bad..name", "a b", "-x.example"])
def test_upstream_host_must_be_a_hostname_or_ip(host: str) -> None:
    doc = _doc()
    doc["outbound"][0]["upstream"] = f"{host}:8443"
    assert _refused(doc).startswith("outbound[0].upstream:")


def test_server_name_and_sni_when_valid() -> None:
    doc = _doc()
    doc["outbound"][0]["server_name"] = "bücher.example"
    route = parse_config(doc).outbound[0]
    assert route.sni == b"xn--bcher-kva.example"
    # without server_name, a DNS upstream is its own SNI; an IP upstream sends none
    assert parse_config(_doc()).outbound[0].sni == b"api.internal"
    ip = _doc()
    ip["outbound"][0]["upstream"] = "[::1]:8443"
    assert parse_config(ip).outbound[0].sni is None


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("api", True),
        ("api.internal", True),
        ("my_service.local", True),
        ("10.0.0.1", True),
        ("::1", True),
        ("a" * 63 + ".example", True),
        ("a" * 64 + ".example", False),
        (".".join(["a" * 60] * 5), False),  # longer than 253
        ("bad..name", False),
        ("", False),
        ("a/b", False),
    ],
)
def test_valid_hostname(text: str, ok: bool) -> None:
    assert valid_hostname(text) is ok


def test_a_dialled_address_needs_a_port() -> None:
    doc = _doc()
    doc["outbound"][0]["upstream"] = "127.0.0.1:0"
    assert _refused(doc).startswith("outbound[0].upstream: port 0")
    inbound = _doc(inbound={"listen": "127.0.0.1:0", "forward": "127.0.0.1:0"})
    assert _refused(inbound).startswith("inbound.forward: port 0")
    # a listener on port 0 is fine: the kernel picks one
    assert parse_config(_doc()).outbound[0].listen.port == 0


@pytest.mark.parametrize("port", ["65536", "-1", "٣", "", "80a"])
def test_ports_are_checked(port: str) -> None:
    doc = _doc()
    doc["outbound"][0]["upstream"] = f"api:{port}"
    assert _refused(doc).startswith("outbound[0].upstream:")


def _static_federated(value: object) -> dict[str, Any]:
    return _doc(static={"cert": "c.pem", "key": "k.pem", "bundle": "b.pem", "federated": value})


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({"example.org": "own.pem"}, "own trust domain"),
        ({"Not A Domain!": "x.pem"}, "static.federated.Not A Domain!"),
        ({"b.example": 7}, "expected the path of a PEM bundle"),
        ("b.pem", "expected a table"),
    ],
)
def test_federated_bundles_are_checked(value: object, says: str) -> None:
    assert says in _refused(_static_federated(value))


def test_federated_bundles_are_kept_by_trust_domain() -> None:
    config = parse_config(_static_federated({"b.example": "fed/b.pem"}))
    source = config.source
    assert isinstance(source, StaticSource)
    assert [(str(td), path.name) for td, path in source.federated] == [("b.example", "b.pem")]
    assert {str(td) for td in source.domains()} == {"b.example"}


# -- authority.server: one address, or a list of instances to fail over between --


def _authority(server: object) -> dict[str, Any]:
    doc = _doc()
    del doc["static"]
    doc["authority"] = {"server": server, "bundle": "b.pem", "state_dir": "state"}
    return doc


def test_a_single_server_string_still_works() -> None:
    source = parse_config(_authority("ca.internal:8443")).source
    assert isinstance(source, AuthoritySource)
    assert source.servers == (Address("ca.internal", 8443),)
    assert source.server == Address("ca.internal", 8443)


def test_several_servers_are_kept_in_order() -> None:
    servers = ["ca1.internal:8443", "ca2.internal:8443", "[::1]:8443"]
    source = parse_config(_authority(servers)).source
    assert isinstance(source, AuthoritySource)
    assert [str(a) for a in source.servers] == servers
    assert source.server == Address("ca1.internal", 8443)  # the first is tried first


def test_sixteen_servers_are_the_most() -> None:
    many = [f"ca{i}.internal:8443" for i in range(MAX_SERVERS)]
    source = parse_config(_authority(many)).source
    assert isinstance(source, AuthoritySource) and len(source.servers) == MAX_SERVERS


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ([], "authority.server: name at least one server"),
        (
            [f"ca{i}.internal:8443" for i in range(MAX_SERVERS + 1)],
            "authority.server: at most 16 servers, not 17",
        ),
        (
            ["ca1.internal:8443", "ca2.internal:8443", "ca1.internal:8443"],
            "authority.server[2]: 'ca1.internal:8443' is already listed",
        ),
        (["ca1.internal:8443", "ca1.internal"], "authority.server[1]: 'ca1.internal' is not HOST"),
        (["ca1.internal:8443", 8443], 'authority.server[1]: expected "HOST:PORT"'),
        (["ca1.internal:0"], "authority.server[0]: port 0 cannot be connected to"),
        (["bad host!:1"], "authority.server[0]: 'bad host!' is not an IP address or a DNS name"),
        (8443, 'authority.server: expected "HOST:PORT" or a list of them'),
        ({"a": "b"}, 'authority.server: expected "HOST:PORT" or a list of them'),
        ("ca1.internal", "authority.server: 'ca1.internal' is not HOST:PORT"),
    ],
)
def test_bad_server_lists_are_refused_in_one_line(value: object, says: str) -> None:
    assert _refused(_authority(value)).startswith(says)


def test_a_duplicate_is_the_same_address_however_written() -> None:
    message = _refused(_authority(["CA1.internal:8443", "ca1.internal.:8443"]))
    assert message.startswith("authority.server[1]: 'ca1.internal.:8443' is already listed")

"""Misspelt keys and tables in the sidecar config are named as themselves, with a suggestion.

Without a check of each table's keys up front, `upstrem = ...` first shows as
`upstream: missing` and `[[outbond]]` as "no listener": true, but not what
the operator must fix.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from meshid.errors import ConfigError
from meshid.spiffeid import TrustDomain
from sidecar.config import parse_config, parse_policy_file

DYNAMIC = """
trust_domain = "example.org"
identity = "web"

[authority]
server = "127.0.0.1:8443"
bundle = "bundle.pem"
token_file = "web.token"
state_dir = "state"

[[inbound]]
listen = "127.0.0.1:9000"
forward = "127.0.0.1:8000"
proxy_protocol = false

[[outbound]]
listen = "127.0.0.1:9001"
upstream = "127.0.0.1:9443"
identity = "api"
server_name = "api"

[admin]
listen = "127.0.0.1:9100"

[limits]
idle_timeout = "1h"
quarantine_failures = 5

[log]
file = "web.log"
"""

STATIC = """
trust_domain = "example.org"
identity = "web"

[static]
cert = "svid.pem"
key = "svid.key"
bundle = "bundle.pem"
policy = "policy.toml"

[inbound]
listen = "127.0.0.1:9000"
forward = "127.0.0.1:8000"
"""

# (base document, text to replace, its replacement, the key path reported, the suggestion)
CASES = [
    (DYNAMIC, "trust_domain =", "trust_domian =", "trust_domian", "trust_domain"),
    (DYNAMIC, "identity = \"web\"", "identiy = \"web\"", "identiy", "identity"),
    (DYNAMIC, "[[outbound]]", "[[outbond]]", "outbond", "outbound"),
    (DYNAMIC, "[[inbound]]", "[[inbond]]", "inbond", "inbound"),
    (DYNAMIC, "[authority]", "[authorty]", "authorty", "authority"),
    (DYNAMIC, "[admin]", "[admn]", "admn", "admin"),
    (DYNAMIC, "[limits]", "[limit]", "limit", "limits"),
    (DYNAMIC, "[log]", "[logs]", "logs", "log"),
    (DYNAMIC, "server =", "sever =", "authority.sever", "server"),
    (DYNAMIC, "state_dir =", "statedir =", "authority.statedir", "state_dir"),
    (DYNAMIC, "token_file =", "tokenfile =", "authority.tokenfile", "token_file"),
    (DYNAMIC, "forward =", "foward =", "inbound[0].foward", "forward"),
    (DYNAMIC, "proxy_protocol =", "proxy_protcol =", "inbound[0].proxy_protcol", "proxy_protocol"),
    (DYNAMIC, "upstream =", "upstrem =", "outbound[0].upstrem", "upstream"),
    (DYNAMIC, "server_name =", "servername =", "outbound[0].servername", "server_name"),
    (DYNAMIC, 'listen = "127.0.0.1:9100"', 'lisen = "127.0.0.1:9100"', "admin.lisen", "listen"),
    (DYNAMIC, "idle_timeout =", "idle_timout =", "limits.idle_timout", "idle_timeout"),
    (DYNAMIC, "quarantine_failures", "quarantine_failure", "limits.quarantine_failure",
     "quarantine_failures"),
    (DYNAMIC, "\nfile =", "\npath =", "log.path", None),
    (DYNAMIC, "[admin]", "[admin]\ncolour = 1", "admin.colour", None),
    (STATIC, "policy =", "polcy =", "static.polcy", "policy"),
    (STATIC, "[static]", "[statc]", "statc", "static"),
    (STATIC, "cert =", "certs =", "static.certs", "cert"),
    (STATIC, "[inbound]", "[inbound]\n\"for ward\" = 1", 'inbound."for ward"', "forward"),
]  # fmt: skip


@pytest.mark.parametrize("base", [DYNAMIC, STATIC], ids=["dynamic", "static"])
def test_the_base_configs_parse(base: str) -> None:
    assert parse_config(tomllib.loads(base), Path("/etc/meshid")).identity.path == "/web"


@pytest.mark.parametrize(
    ("base", "old", "new", "path", "suggestion"), CASES, ids=[c[3] for c in CASES]
)
def test_an_unknown_key_is_named_with_a_suggestion(
    base: str, old: str, new: str, path: str, suggestion: str | None
) -> None:
    assert old in base
    doc = tomllib.loads(base.replace(old, new, 1))
    with pytest.raises(ConfigError) as caught:
        parse_config(doc, Path("/etc/meshid"))
    if suggestion is not None:
        assert caught.value.message == f"{path}: unknown key (did you mean {suggestion!r}?)"
    else:  # nothing close: the keys the table knows
        assert caught.value.message.startswith(f"{path}: unknown key (known keys: ")


def test_the_static_policy_file_is_checked_too() -> None:
    td = TrustDomain("example.org")
    assert parse_policy_file(tomllib.loads('[[allow]]\nfrom = "web"\nto = "api"\n'), td)
    with pytest.raises(ConfigError) as caught:
        parse_policy_file(tomllib.loads('[[allow]]\nfrom = "web"\ntoo = "api"\n'), td)
    assert caught.value.message == "allow[0].too: unknown key (did you mean 'to'?)"
    with pytest.raises(ConfigError) as caught:
        parse_policy_file(tomllib.loads('[[alow]]\nfrom = "web"\nto = "api"\n'), td)
    assert caught.value.message == "alow: unknown key (did you mean 'allow'?)"


def test_sidecar_run_reports_the_typo_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "web.toml"
    config.write_text(DYNAMIC.replace("upstream =", "upstrem =", 1))
    meshid = Path(sys.executable).with_name("meshid")
    done = subprocess.run(
        [meshid, "sidecar", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr == ("Error: outbound[0].upstrem: unknown key (did you mean 'upstream'?)\n")


def test_the_static_policy_file_takes_prefix_rules(tmp_path: Path) -> None:
    from meshid.spiffeid import SpiffeId
    from sidecar.static import load_policy

    td = TrustDomain.parse("example.org")
    path = tmp_path / "policy.toml"
    path.write_text(
        '[[allow]]\nfrom = "ns/prod/*"\nto = "api"\n\n[[allow]]\nfrom = "web"\nto = "api"\n'
    )
    policy = load_policy(path, td, 1)
    api = SpiffeId.resolve("api", td)
    assert policy.decide(SpiffeId.resolve("ns/prod/x", td), api).allowed
    assert policy.decide(SpiffeId.resolve("web", td), api).allowed
    assert not policy.decide(SpiffeId.resolve("ns/dev/x", td), api).allowed
    path.write_text('[[allow]]\nfrom = "*"\nto = "api"\n')
    with pytest.raises(ConfigError, match="allow"):
        load_policy(path, td, 2)

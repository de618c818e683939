"""Fuzzing the control plane's request handling and the sidecar's config parser.

Whatever a client sends, the API answers with a JSON error of a known shape
and changes nothing; whatever a config file holds, the parser accepts it or
raises one of our errors naming the key, never anything else.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ca_helpers import TD, Clock, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ca.api import ControlApi, Request
from ca.authority import Authority
from meshid.errors import MeshIdError
from meshid.ratelimit import FailureLimiter
from meshid.spiffeid import SpiffeId
from meshid.svid import generate_key
from sidecar.config import parse_config
from sidecar.dynamic import build_csr

STATUSES = {200, 400, 401, 403, 404, 405, 429}
PATHS = st.sampled_from(
    ["/v1/enroll", "/v1/renew", "/v1/report", "/v1/watch", "/v1/bundle", "/healthz", "/x"]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
BODIES = (
    st.binary(max_size=300)
    | JSON_VALUES.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries(
        {"token": st.text(max_size=60) | st.integers(), "csr": st.text(max_size=200)}
    ).map(lambda v: json.dumps(v).encode())
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(method=st.sampled_from(["GET", "POST", "PUT"]), path=PATHS, body=BODIES)
def test_api_answers_garbage_with_a_json_error_and_changes_nothing(
    authority: Authority, state: Path, clock: Clock, method: str, path: str, body: bytes
) -> None:
    api = ControlApi(authority, clock, time.monotonic, FailureLimiter(max_failures=10**9))
    before = snapshot(state)
    reply = api.handle(Request(method, path, {}, body, "127.0.0.1", None))
    assert reply.status in STATUSES
    json.loads(reply.encode())
    if reply.status != 200:
        assert set(reply.body) == {"error", "message"}
        assert reply.body["error"].replace("_", "").isalnum()
        assert "\n" not in reply.body["message"]
    else:  # only the public, read-only endpoints answer without credentials
        assert path in ("/v1/bundle", "/healthz") and method == "GET"
    assert snapshot(state) == before


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(token=st.text(min_size=1, max_size=80))
def test_a_guessed_token_never_enrolls(authority: Authority, clock: Clock, token: str) -> None:
    real = authority.create_token(SpiffeId(TD, "/web"))
    api = ControlApi(authority, clock, time.monotonic, FailureLimiter(max_failures=10**9))
    csr = build_csr(generate_key(), SpiffeId(TD, "/web")).decode()
    reply = api.handle(
        Request("POST", "/v1/enroll", {}, json.dumps({"token": token, "csr": csr}).encode(), "x")
    )
    if token != real:
        assert reply.status == 401 and reply.body["error"] == "token_unknown"
        assert authority.token_grant(real) is not None


TOML_VALUES = st.recursive(
    st.booleans() | st.integers(-5, 70000) | st.text(max_size=30) | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=10,
)
KEYS = st.sampled_from(
    [
        "identity",
        "trust_domain",
        "authority",
        "static",
        "inbound",
        "outbound",
        "admin",
        "limits",
        "log",
        "listen",
        "forward",
        "upstream",
        "server",
        "bundle",
        "cert",
        "key",
        "state_dir",
    ]
)


def _valid() -> dict[str, Any]:
    return {
        "identity": "web",
        "trust_domain": "example.org",
        "static": {"cert": "a.pem", "key": "a.key", "bundle": "b.pem"},
        "inbound": {"listen": "127.0.0.1:1", "forward": "127.0.0.1:2"},
        "limits": {"idle_timeout": "5m"},
    }


@settings(max_examples=400, deadline=None)
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["", "static", "inbound", "limits", "authority"]), KEYS, TOML_VALUES
        ),
        max_size=4,
    ),
    junk=st.dictionaries(KEYS | st.text(max_size=10), TOML_VALUES, max_size=3),
)
def test_config_parser_accepts_or_names_the_problem(
    edits: list[tuple[str, str, Any]], junk: dict[str, Any]
) -> None:
    doc = _valid() | junk
    for table, key, value in edits:
        target = doc.setdefault(table, {}) if table else doc
        if isinstance(target, dict):
            target[key] = value
    try:
        parse_config(doc, Path("/nonexistent"))
    except MeshIdError as exc:
        assert exc.message and "\n" not in exc.message

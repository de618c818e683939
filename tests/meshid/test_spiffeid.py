"""SPIFFE IDs and trust domains: the SPIFFE ID specification, case by case, then fuzzed."""

from __future__ import annotations

import pytest
import spiffe
from hypothesis import given, settings
from hypothesis import strategies as st

from meshid.errors import InvalidIdentity
from meshid.spiffeid import MAX_ID_BYTES, SpiffeId, TrustDomain

TD = TrustDomain("example.org")
FUZZ = settings(max_examples=250, deadline=None)


def _id_of_length(n: int) -> str:
    prefix = "spiffe://example.org/"
    return prefix + "a" * (n - len(prefix))


VALID_IDS = [
    "spiffe://example.org",  # the trust domain's own ID
    "spiffe://example.org/web",
    "spiffe://example.org/ns/prod/sa/web",
    "spiffe://example.org/Upper/Case/PATH",
    "spiffe://my-td_1.internal/a-b_c.d",
    "spiffe://1.2.3.4/web",  # digits and dots are just characters here
    "spiffe://example.org/..a/a../.hidden/x.",  # only exact '.' and '..' are segments to refuse
    "spiffe://a/b",
    _id_of_length(MAX_ID_BYTES),
]


@pytest.mark.parametrize("text", VALID_IDS)
def test_valid_ids_parse_and_round_trip(text: str) -> None:
    sid = SpiffeId.parse(text)
    assert str(sid) == text
    assert SpiffeId.parse(str(sid)) == sid
    # an independent implementation agrees
    assert str(spiffe.SpiffeId(text)) == text


INVALID_IDS = [
    ("", "empty"),
    ("example.org/web", "scheme"),
    ("http://example.org/web", "scheme"),
    ("spiffe:/example.org/web", "scheme"),
    ("spiffe:example.org/web", "scheme"),
    (" spiffe://example.org/web", "scheme"),
    ("SPIFFE://example.org/web", "scheme must be lowercase"),
    ("Spiffe://example.org/web", "scheme must be lowercase"),
    ("spiffe://", "trust domain is empty"),
    ("spiffe:///web", "trust domain is empty"),
    ("spiffe://Example.org/web", "lowercase"),
    ("spiffe://EXAMPLE.ORG", "lowercase"),
    ("spiffe://exa mple.org/web", "trust domain may only hold"),
    ("spiffe://exämple.org/web", "trust domain may only hold"),
    ("spiffe://[::1]/web", "trust domain may only hold"),
    ("spiffe://example.org\\web", "trust domain may only hold"),
    ("spiffe://" + "a" * 256 + "/web", "longer than 255 bytes"),
    ("spiffe://example.org:8443/web", "port"),
    ("spiffe://example.org:8443", "port"),
    ("spiffe://user@example.org/web", "user info"),
    ("spiffe://user:secret@example.org/web", "port"),  # ':' comes first; refused either way
    ("spiffe://example.org?x=1", "query"),
    ("spiffe://example.org#frag", "fragment"),
    ("spiffe://example.org/", "may not end with '/'"),
    ("spiffe://example.org/web/", "may not end with '/'"),
    ("spiffe://example.org//web", "empty segment"),
    ("spiffe://example.org/a//b", "empty segment"),
    ("spiffe://example.org/./web", "'.' or '..'"),
    ("spiffe://example.org/../web", "'.' or '..'"),
    ("spiffe://example.org/web/.", "'.' or '..'"),
    ("spiffe://example.org/web/..", "'.' or '..'"),
    ("spiffe://example.org/w%65b", "percent-encoding"),
    ("spiffe://example.org/web?x=1", "query"),
    ("spiffe://example.org/web#frag", "fragment"),
    ("spiffe://example.org/we b", "path may only hold"),
    ("spiffe://example.org/wéb", "path may only hold"),
    ("spiffe://example.org/web\n", "path may only hold"),
    ("spiffe://example.org/a:b", "path may only hold"),
    ("spiffe://example.org/a@b", "path may only hold"),
    ("spiffe://\ud800/web", "trust domain may only hold"),  # a lone surrogate, as argv can hold
    ("spiffe://example.org/\udcff", "path may only hold"),
    (_id_of_length(MAX_ID_BYTES + 1), "longer than 2048 bytes"),
]


@pytest.mark.parametrize(("text", "why"), INVALID_IDS)
def test_invalid_ids_are_refused_with_a_one_line_reason(text: str, why: str) -> None:
    with pytest.raises(InvalidIdentity) as info:
        SpiffeId.parse(text)
    assert why in info.value.message
    assert "\n" not in info.value.message
    assert info.value.reason == "invalid_spiffe_id"


def test_error_messages_quote_long_input_briefly() -> None:
    with pytest.raises(InvalidIdentity) as info:
        SpiffeId.parse("spiffe://example.org/" + "x" * 1000 + "/")
    assert len(info.value.message) < 200


VALID_TRUST_DOMAINS = [
    ("example.org", "example.org"),
    ("spiffe://example.org", "example.org"),
    ("a", "a"),
    ("my-td_1.internal", "my-td_1.internal"),
    ("a" * 255, "a" * 255),
]


@pytest.mark.parametrize(("text", "name"), VALID_TRUST_DOMAINS)
def test_valid_trust_domains(text: str, name: str) -> None:
    td = TrustDomain.parse(text)
    assert td.name == name
    assert str(td.id) == f"spiffe://{name}"
    assert not td.id.is_workload


INVALID_TRUST_DOMAINS = [
    "",
    "spiffe://",
    "Example.org",
    "SPIFFE://example.org",
    "example.org/web",
    "spiffe://example.org/",
    "spiffe://example.org/web",
    "example.org:8443",
    "user@example.org",
    "exa mple.org",
    "ex%41mple.org",
    "example.org?x",
    "a" * 256,
    "\ud800",
]


@pytest.mark.parametrize("text", INVALID_TRUST_DOMAINS)
def test_invalid_trust_domains(text: str) -> None:
    with pytest.raises(InvalidIdentity):
        TrustDomain.parse(text)


RESOLVED = [
    ("web", "spiffe://example.org/web"),
    ("ns/prod/sa/web", "spiffe://example.org/ns/prod/sa/web"),
    ("/web", "spiffe://example.org/web"),
    ("spiffe://example.org/web", "spiffe://example.org/web"),
    ("spiffe://example.org", "spiffe://example.org"),  # legal here; workloads refuse it
]


@pytest.mark.parametrize(("text", "expected"), RESOLVED)
def test_bare_paths_resolve_in_the_trust_domain(text: str, expected: str) -> None:
    assert str(SpiffeId.resolve(text, TD)) == expected


UNRESOLVABLE = [
    ("", "invalid_spiffe_id"),
    ("/", "invalid_spiffe_id"),
    ("web/", "invalid_spiffe_id"),
    ("//web", "invalid_spiffe_id"),
    ("a/../b", "invalid_spiffe_id"),
    ("we b", "invalid_spiffe_id"),
    ("web?x=1", "invalid_spiffe_id"),
    ("SPIFFE://example.org/web", "invalid_spiffe_id"),
    ("https://example.org/web", "invalid_spiffe_id"),
    ("spiffe://other.org/web", "untrusted_trust_domain"),
    ("spiffe://example.org.evil/web", "untrusted_trust_domain"),
    ("spiffe://other.org", "untrusted_trust_domain"),
]


@pytest.mark.parametrize(("text", "reason"), UNRESOLVABLE)
def test_unresolvable_ids_are_refused(text: str, reason: str) -> None:
    with pytest.raises(InvalidIdentity) as info:
        SpiffeId.resolve(text, TD)
    assert info.value.reason == reason


def test_workload_ids_need_a_path() -> None:
    assert SpiffeId.parse("spiffe://example.org/web").require_workload()
    with pytest.raises(InvalidIdentity, match="needs a path"):
        SpiffeId.parse("spiffe://example.org").require_workload()


def test_constructor_validates_too() -> None:
    assert str(SpiffeId(TD, "/web")) == "spiffe://example.org/web"
    for path in ("web", "/web/", "/a//b", "/a/./b", "/a%20b"):
        with pytest.raises(InvalidIdentity):
            SpiffeId(TD, path)
    with pytest.raises(InvalidIdentity):
        TrustDomain("Example.org")


# --- fuzzing ------------------------------------------------------------------

_TRICKY = "spifeSPIFE:/.%?#@-_aZ09 \t\n\\é\u0130\ud800\U0001f600"
arbitrary_text = st.one_of(
    st.text(),
    st.text(alphabet=_TRICKY, max_size=40),
    st.text(alphabet=_TRICKY).map(lambda s: "spiffe://" + s),
    st.text(alphabet=_TRICKY).map(lambda s: "spiffe://example.org/" + s),
)


@FUZZ
@given(arbitrary_text)
def test_parsers_raise_only_invalid_identity(text: str) -> None:
    for parse in (
        SpiffeId.parse,
        TrustDomain.parse,
        lambda t: SpiffeId.resolve(t, TD),
    ):
        try:
            parse(text)
        except InvalidIdentity as exc:
            assert "\n" not in exc.message


trust_domains = st.from_regex(r"[a-z0-9._-]{1,30}", fullmatch=True)
segments = st.from_regex(r"[a-zA-Z0-9._-]{1,12}", fullmatch=True).filter(
    lambda s: s not in (".", "..")
)
paths = st.lists(segments, max_size=6).map(lambda segs: "".join("/" + s for s in segs))


@FUZZ
@given(trust_domains, paths)
def test_generated_valid_ids_round_trip(td: str, path: str) -> None:
    text = f"spiffe://{td}{path}"
    sid = SpiffeId.parse(text)
    assert str(sid) == text
    assert sid == SpiffeId(TrustDomain(td), path)
    assert sid.is_workload == bool(path)
    assert str(spiffe.SpiffeId(text)) == text
    if path:
        assert SpiffeId.resolve(path[1:], TrustDomain(td)) == sid

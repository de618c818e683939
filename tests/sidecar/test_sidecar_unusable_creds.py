"""Credentials that pass our checks but that OpenSSL refuses: a failed reload, not a dead sidecar.

A certificate with a 1024-bit RSA key chains to our root, names the right
identity and is valid now, yet OpenSSL's security level will not load it
("ee key too small"). Whoever can write the static files must not be able to
end the process with it; the previous credentials stay in force.
"""

from __future__ import annotations

import json
from datetime import timedelta

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from sidecar_helpers import TD, Creds, receive_exactly, roundtrip, sid, utcnow
from sidecar_mesh import Pair, Pki, Running

from meshid.errors import InvalidSvid
from meshid.spiffeid import SpiffeId
from sidecar.credentials import Generation, Svid


def _weak(pki: Pki, name: str) -> Creds:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    now = utcnow()
    ski = pki.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(pki.root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid(name))]),
            critical=True,
        )
        .sign(pki.root_key, hashes.SHA256())
    )
    return Creds((cert,), key)


def _serial(side: Running) -> str:
    return str(json.loads(side.sidecar.route("GET", "/svid").body)["serial"])


def test_a_generation_openssl_refuses_is_an_invalid_svid(pki: Pki) -> None:
    weak = _weak(pki, "web")
    svid = Svid.check(
        list(weak.chain), weak.key, pki.authority.bundle(), SpiffeId.resolve("web", TD), utcnow()
    )
    try:
        Generation.build(1, svid, lambda *_: True)
    except InvalidSvid as exc:
        assert exc.reason == "unusable_credentials"
        assert "PRIVATE" not in exc.message
    else:
        raise AssertionError("OpenSSL was expected to refuse a 1024-bit RSA key")


async def test_a_reload_openssl_refuses_keeps_the_previous_credentials(
    pair: Pair, pki: Pki
) -> None:
    web = pair.web
    old = _serial(web)
    with trio.fail_after(20):
        live = await trio.open_tcp_stream(*pair.app)
        async with live:
            await live.send_all(b"before")
            assert await receive_exactly(live, 6) == b"before"
            web.write_creds(_weak(pki, "web"))
            [failed] = await web.log.wait_for("reload_failed")
            assert await roundtrip(pair.app, b"still up") == b"still up"
    assert failed["reason"] == "unusable_credentials"
    assert failed["keeping_serial"] == old == _serial(web)

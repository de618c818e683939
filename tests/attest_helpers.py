"""An OIDC issuer for tests: keys, a JWKS, and tokens shaped like Kubernetes' own.

The claims are those of a projected ServiceAccount token as the Kubernetes
documentation gives them (iss, sub, aud, exp, iat, nbf, and `kubernetes.io`
with namespace, pod, serviceaccount and node).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshid.jwtattest import Attestor
from meshid.jwtsvid import public_jwk
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import build_root, build_svid, certs_to_pem, generate_key, key_to_pem

ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "meshid"
K8S_TEMPLATE = "ns/{kubernetes.io.namespace}/sa/{kubernetes.io.serviceaccount.name}"
POD_UID = "6f2c1b0e-3a51-4c1e-9d2a-0f7e4c9b1a22"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Issuer:
    """Signing keys by kid; `jwks()` publishes the public halves as Kubernetes does."""

    keys: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = field(default_factory=dict)

    def new_key(self, kid: str, *, ec_key: bool = False) -> str:
        self.keys[kid] = (
            ec.generate_private_key(ec.SECP256R1())
            if ec_key
            else rsa.generate_private_key(public_exponent=65537, key_size=2048)
        )
        return kid

    def jwks(self) -> dict[str, Any]:
        """The public keys, EC coordinates at full length as RFC 7518 requires.

        Not PyJWT's `to_jwk`: before 2.9 it drops an EC coordinate's leading
        zero bytes, which its own reader then refuses, about one key in 110.
        """
        entries = []
        for kid, key in self.keys.items():
            alg = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
            jwk = public_jwk(key.public_key(), kid)
            entries.append({**jwk, "use": "sig", "kid": kid, "alg": alg})
        return {"keys": entries}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def token(self, claims: dict[str, Any], kid: str, **headers: Any) -> str:
        key = self.keys[kid]
        alg = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, **headers})

    def public_pem(self, kid: str) -> bytes:
        return (
            self.keys[kid]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def cluster_attestor(jwks: Path, name: str = "cluster", **changes: Any) -> Attestor:
    """The attestor a cluster's operator adds: ServiceAccount tokens for audience meshid."""
    fields: dict[str, Any] = {
        "name": name,
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "template": K8S_TEMPLATE,
        "jwks_file": str(jwks),
        **changes,
    }
    return Attestor(**fields)


def sa_claims(
    now: datetime,
    *,
    namespace: str = "shop",
    sa: str = "api",
    audience: str = AUDIENCE,
    issuer: str = ISSUER,
    ttl: timedelta = timedelta(hours=1),
) -> dict[str, Any]:
    """A projected ServiceAccount token's claims, as the kubelet gets them."""
    iat = int(now.timestamp())
    return {
        "aud": [audience],
        "exp": iat + int(ttl.total_seconds()),
        "iat": iat,
        "iss": issuer,
        "nbf": iat,
        "sub": f"system:serviceaccount:{namespace}:{sa}",
        "kubernetes.io": {
            "namespace": namespace,
            "node": {"name": "node-1", "uid": "0a7b4c52-8f1e-4d3b-a6c9-2e5d7f8a9b10"},
            "pod": {"name": f"{sa}-7d9f8c6b5-x2k4q", "uid": POD_UID},
            "serviceaccount": {"name": sa, "uid": "c1d2e3f4-0000-4111-8222-933344455566"},
        },
    }


def unsigned(claims: dict[str, Any], kid: str) -> str:
    """`alg: none`: no signature at all."""
    head = _b64(json.dumps({"alg": "none", "kid": kid, "typ": "JWT"}).encode())
    return f"{head}.{_b64(json.dumps(claims).encode())}."


def hs256_with_public_key(claims: dict[str, Any], kid: str, public_pem: bytes) -> str:
    """The algorithm-confusion attack: HMAC keyed with the issuer's public key."""
    head = _b64(json.dumps({"alg": "HS256", "kid": kid, "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    mac = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(mac)}"


@dataclass
class Served:
    """What the test's JWKS server does: how often it was asked, whether it fails."""

    requests: int = 0
    failing: bool = False


@contextmanager
def https_jwks(
    issuer: Issuer,
    tmp: Path,
    now: datetime,
    *,
    redirect: str | None = None,
    served: Served | None = None,
) -> Iterator[tuple[str, ssl.SSLContext]]:
    """The issuer's JWKS over HTTPS on 127.0.0.1 (port 0), and a context that trusts it."""
    td = TrustDomain("issuer.test")
    root_key, leaf_key = generate_key(), generate_key()
    root = build_root(
        td, root_key, not_before=now - timedelta(hours=1), not_after=now + timedelta(days=1)
    )
    leaf = build_svid(
        subject_key=leaf_key.public_key(),
        spiffe_id=SpiffeId.parse("spiffe://issuer.test/jwks"),
        issuer=root,
        issuer_key=root_key,
        now=now,
        ttl=timedelta(hours=1),
        dns_names=["localhost"],
        ip_addresses=[ipaddress.ip_address("127.0.0.1")],
    )
    (tmp / "srv.pem").write_bytes(certs_to_pem([leaf]))
    (tmp / "srv.key").write_bytes(key_to_pem(leaf_key, None))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp / "srv.pem", tmp / "srv.key")
    client_ctx = ssl.create_default_context(cadata=certs_to_pem([root]).decode())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if served is not None:
                served.requests += 1
                if served.failing:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            if redirect is not None:
                self.send_response(302)
                self.send_header("Location", redirect)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = json.dumps(issuer.jwks()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/openid/v1/jwks", client_ctx
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

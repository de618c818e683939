"""The sidecar test mesh: a PKI from our own authority, sidecars in this process, pairs.

Shared by the sidecar tests; the fixtures that build these live in conftest.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from sidecar_helpers import (
    TD,
    Addr,
    Backend,
    Creds,
    LogCapture,
    fmt,
    forge,
    policy_toml,
    utcnow,
)

from ca.authority import Authority
from meshid.clock import Clock
from meshid.events import EventLog
from meshid.spiffeid import SpiffeId
from meshid.svid import PrivateKey, certs_to_pem, generate_key
from sidecar.app import Sidecar
from sidecar.config import parse_config


@dataclass
class Pki:
    authority: Authority
    root: x509.Certificate
    root_key: PrivateKey

    @property
    def bundle_pem(self) -> bytes:
        return certs_to_pem([self.root])

    def issue(self, name: str, ttl: timedelta | None = None) -> Creds:
        """A proper SVID for `name`, issued by the authority itself."""
        key = generate_key()
        issued = self.authority.issue(SpiffeId.resolve(name, TD), key.public_key(), ttl=ttl)
        return Creds(issued.chain, key)

    def forge(
        self,
        *uris: str,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        ca: bool = False,
    ) -> Creds:
        """A certificate signed by our root with the defects the test asks for."""
        now = utcnow()
        return forge(
            uris=uris,
            issuer=self.root,
            issuer_key=self.root_key,
            not_before=not_before or now - timedelta(minutes=5),
            not_after=not_after or now + timedelta(hours=1),
            ca=ca,
        )


@dataclass
class Running:
    """One sidecar started by `mesh`, with its files and its captured decision log."""

    name: str
    sidecar: Sidecar
    log: LogCapture
    dir: Path

    @property
    def inbound(self) -> Addr:
        return self.sidecar.bound["inbound[0]"]

    def outbound(self, index: int = 0) -> Addr:
        return self.sidecar.bound[f"outbound[{index}]"]

    @property
    def admin(self) -> Addr:
        return self.sidecar.bound["admin"]

    def _replace(self, name: str, data: bytes) -> None:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.dir / name)

    def write_creds(self, creds: Creds) -> None:
        """Swap cert and key in one synchronous step, so no poll sees half of it."""
        self._replace("svid.pem", creds.cert_pem())
        self._replace("svid.key", creds.key_pem())

    def write_file(self, name: str, data: bytes) -> None:
        self._replace(name, data)

    def write_policy(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._replace("policy.toml", policy_toml(pairs).encode())


class Mesh:
    def __init__(self, nursery: trio.Nursery, pki: Pki, root: Path) -> None:
        self.nursery = nursery
        self.pki = pki
        self.root = root

    async def start(
        self,
        name: str,
        *,
        forward: Addr | None = None,
        proxy_protocol: bool = False,
        outbound: Sequence[tuple[str, Addr]] = (),
        allow: Iterable[tuple[str, str]] = (),
        limits: Mapping[str, Any] | None = None,
        creds: Creds | None = None,
        host: str = "127.0.0.1",
        listen: Addr | None = None,
        reload_interval: float = 0.05,
        sweep_interval: float = 0.05,
        clock: Clock | None = None,
        workload_api: Mapping[str, Any] | None = None,
        federated: Mapping[str, bytes] | None = None,
    ) -> Running:
        directory = self.root / name
        directory.mkdir(parents=True)
        creds = creds or self.pki.issue(name)
        (directory / "svid.pem").write_bytes(creds.cert_pem())
        (directory / "svid.key").write_bytes(creds.key_pem())
        (directory / "bundle.pem").write_bytes(self.pki.bundle_pem)
        (directory / "policy.toml").write_text(policy_toml(allow))
        doc: dict[str, Any] = {
            "identity": name,
            "trust_domain": TD.name,
            "static": {
                "cert": "svid.pem",
                "key": "svid.key",
                "bundle": "bundle.pem",
                "policy": "policy.toml",
            },
            "admin": {"listen": fmt((host, 0))},
        }
        if federated:
            for td, pem in federated.items():
                (directory / f"bundle-{td}.pem").write_bytes(pem)
            doc["static"]["federated"] = {td: f"bundle-{td}.pem" for td in federated}
        if forward is not None:
            doc["inbound"] = {
                "listen": fmt(listen or (host, 0)),
                "forward": fmt(forward),
                "proxy_protocol": proxy_protocol,
            }
        doc["outbound"] = [
            {"listen": fmt((host, 0)), "upstream": fmt(a), "identity": who} for who, a in outbound
        ]
        if limits:
            doc["limits"] = dict(limits)
        if workload_api is not None:
            doc["workload_api"] = dict(workload_api)
        log = LogCapture()
        sidecar = Sidecar(
            parse_config(doc, directory),
            events=EventLog(log),
            reload_interval=reload_interval,
            sweep_interval=sweep_interval,
            clock=clock,
        )
        started = await self.nursery.start(sidecar.run)
        assert started is sidecar
        return Running(name, sidecar, log, directory)


@dataclass
class Pair:
    web: Running
    api: Running
    backend: Backend

    @property
    def app(self) -> Addr:
        """Where web's local app connects to reach api."""
        return self.web.outbound()


async def start_pair(
    mesh: Mesh,
    backend: Backend,
    *,
    web_allows: Sequence[tuple[str, str]] = (("web", "api"),),
    api_allows: Sequence[tuple[str, str]] = (("web", "api"),),
    web_limits: Mapping[str, Any] | None = None,
    api_limits: Mapping[str, Any] | None = None,
    proxy_protocol: bool = False,
    host: str = "127.0.0.1",
) -> Pair:
    api = await mesh.start(
        "api",
        forward=backend.addr,
        allow=api_allows,
        limits=api_limits,
        proxy_protocol=proxy_protocol,
        host=host,
    )
    web = await mesh.start(
        "web", outbound=[("api", api.inbound)], allow=web_allows, limits=web_limits, host=host
    )
    return Pair(web, api, backend)


def write_static_config(directory: Path, pki: Pki, forward: Addr, *, extra: str = "") -> Path:
    """A static-mode `api` sidecar config for the real CLI: inbound to FORWARD, events to a file."""
    creds = pki.issue("api")
    (directory / "svid.pem").write_bytes(creds.cert_pem())
    (directory / "svid.key").write_bytes(creds.key_pem())
    (directory / "bundle.pem").write_bytes(pki.bundle_pem)
    (directory / "policy.toml").write_text(policy_toml([("web", "api")]))
    config = directory / "sidecar.toml"
    config.write_text(
        f'identity = "api"\ntrust_domain = "{TD}"\n'
        '[static]\ncert = "svid.pem"\nkey = "svid.key"\nbundle = "bundle.pem"\n'
        'policy = "policy.toml"\n'
        f'[inbound]\nlisten = "127.0.0.1:0"\nforward = "{forward[0]}:{forward[1]}"\n'
        '[admin]\nlisten = "127.0.0.1:0"\n'
        '[log]\nfile = "events.jsonl"\n' + extra
    )
    return config

"""Sidecar configuration: one pure, total parse from a TOML document to frozen dataclasses.

Every error names the key that is wrong (``outbound[0].identity: not a
SPIFFE ID``). Every table declares the keys it knows and is checked against
them before any value is read, so a misspelt key or table is reported as
itself, with the nearest known key (``outbound[0].upstrem: unknown key (did
you mean 'upstream'?)``), rather than as the key it failed to set being
missing. Loading a file is `tomllib` plus `parse_config`; nothing here
touches a socket or reads a certificate.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from meshid.errors import ConfigError, MeshIdError
from meshid.federation import resolve_id, resolve_rule_end
from meshid.spiffeid import SpiffeId, TrustDomain
from sidecar.configtable import Table, tables
from sidecar.failover import MAX_SERVERS
from sidecar.transparent import KEYS as TRANSPARENT_KEYS
from sidecar.transparent import Transparent, parse_transparent
from sidecar.workload.settings import KEYS as WORKLOAD_API_KEYS
from sidecar.workload.settings import WorkloadApiConfig, parse_workload_api


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class StaticSource:
    cert: Path
    key: Path
    bundle: Path
    policy: Path | None
    # Bundles of federated trust domains (PEM), one file per trust domain.
    federated: tuple[tuple[TrustDomain, Path], ...] = ()

    def files(self) -> tuple[Path, ...]:
        """The files of the credentials: a change in any of them reloads all."""
        return (self.cert, self.key, self.bundle, *(path for _, path in self.federated))

    def domains(self) -> frozenset[TrustDomain]:
        """The federated trust domains, whose full IDs the allow-list may name."""
        return frozenset(td for td, _ in self.federated)


@dataclass(frozen=True, slots=True)
class AuthoritySource:
    # The `meshid ca serve` instances of the trust domain, in the order they are tried
    # (see `sidecar.failover`); one or more, at most `MAX_SERVERS`.
    servers: tuple[Address, ...]
    bundle: Path
    token_file: Path | None
    state_dir: Path
    jwt_file: Path | None = None  # a platform-issued JWT, re-read on every enrollment attempt

    @property
    def server(self) -> Address:
        """The first server: the one tried first, and the only one of a single-server config."""
        return self.servers[0]


@dataclass(frozen=True, slots=True)
class Inbound:
    listen: Address
    forward: Address
    proxy_protocol: bool = False


@dataclass(frozen=True, slots=True)
class Outbound:
    listen: Address
    upstream: Address
    identity: SpiffeId
    server_name: str | None = None
    # What goes in the TLS SNI extension (server_name, else a DNS upstream host),
    # IDNA-encoded once here so that no connection can meet an unencodable name.
    sni: bytes | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    handshake_timeout: float = 10.0
    idle_timeout: float = 3600.0
    connect_timeout: float = 5.0
    drain_timeout: float = 30.0
    max_connections: int = 10000
    close_on_peer_expiry: bool = True
    clock_skew: float = 60.0
    # Refusals within the window that block for the period (0: never). A peer that
    # proved its SPIFFE ID is counted by that ID; anything refused before it proved
    # one (junk, failed handshakes, certificates refused before key possession was
    # shown) by its source address, with a much higher bar, since many peers may
    # share an address behind a NAT. See sidecar/quarantine.py.
    quarantine_failures: int = 20
    quarantine_address_failures: int = 200
    quarantine_window: float = 60.0
    quarantine_period: float = 300.0


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    identity: SpiffeId
    trust_domain: TrustDomain
    source: StaticSource | AuthoritySource
    inbound: tuple[Inbound, ...]
    outbound: tuple[Outbound, ...]
    admin: Address | None
    limits: Limits
    log_file: Path | None = None
    workload_api: WorkloadApiConfig | None = None
    transparent: Transparent | None = None


_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def valid_hostname(text: str) -> bool:
    """An IP literal, or a DNS name whose IDNA form has 1-63 character labels and <= 253 in all.

    Underscores are allowed: internal names (container services) use them. No
    trailing dot: callers that accept one strip it first.
    """
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    try:
        ascii_name = text.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    if not ascii_name or len(ascii_name) > 253:
        return False
    return all(_LABEL.fullmatch(label) for label in ascii_name.split("."))


def parse_address(text: Any, key: str, *, dial: bool = False) -> Address:
    """HOST:PORT. `dial`: an address we connect to, where port 0 means nothing."""
    if not isinstance(text, str):
        raise ConfigError(f'{key}: expected "HOST:PORT"')
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host or (":" in host and not text.startswith("[")):
        raise ConfigError(f"{key}: {text[:80]!r} is not HOST:PORT (IPv6 as [::1]:PORT)")
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{key}: {port_text[:10]!r} is not a port number")
    if not valid_hostname(host.removesuffix(".")):
        raise ConfigError(f"{key}: {host[:80]!r} is not an IP address or a DNS name")
    if dial and int(port_text) == 0:
        raise ConfigError(f"{key}: port 0 cannot be connected to")
    return Address(host, int(port_text))


# The keys each table knows; anything else is a typo, reported before any value is read.
TOP_KEYS = (
    "trust_domain",
    "identity",
    "static",
    "authority",
    "inbound",
    "outbound",
    "admin",
    "limits",
    "log",
    "workload_api",
    "transparent",
)
STATIC_KEYS = ("cert", "key", "bundle", "policy", "federated")
AUTHORITY_KEYS = ("server", "bundle", "token_file", "jwt_file", "state_dir")
INBOUND_KEYS = ("listen", "forward", "proxy_protocol")
OUTBOUND_KEYS = ("listen", "upstream", "identity", "server_name")
ADMIN_KEYS = ("listen",)
LIMITS_KEYS = tuple(f.name for f in fields(Limits))
LOG_KEYS = ("file",)
POLICY_FILE_KEYS = ("allow",)
ALLOW_KEYS = ("from", "to")


def _id(
    table: Table, name: str, td: TrustDomain, federated: Collection[TrustDomain] = ()
) -> SpiffeId:
    text = table.string(name)
    try:
        return resolve_id(text, td, federated)
    except MeshIdError as exc:
        raise ConfigError(f"{table.path(name)}: {exc.message}") from None


def _upstream_id(table: Table, td: TrustDomain) -> SpiffeId:
    """An upstream's ID: a bare path in our trust domain, or a full ID of any domain.

    A full ID of another domain names a federated upstream; whether that domain
    is federated is the gate's question when it connects (the authority's feed
    may federate it later), and it refuses one that is not.
    """
    text = table.string("identity")
    if "://" not in text:
        return _id(table, "identity", td)
    try:
        return SpiffeId.parse(text).require_workload()
    except MeshIdError as exc:
        raise ConfigError(f"{table.path('identity')}: {exc.message}") from None


def _same_host(host: str) -> str:
    """A host as a duplicate check sees it: DNS case and a trailing dot do not make another."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.removesuffix(".").lower()


def _servers(table: Table) -> tuple[Address, ...]:
    """`server = "HOST:PORT"` or `server = ["HOST:PORT", ...]`: distinct, 1 to MAX_SERVERS."""
    value = table.required("server")
    where = table.path("server")
    if isinstance(value, str):
        return (parse_address(value, where, dial=True),)
    if not isinstance(value, list):
        raise ConfigError(f'{where}: expected "HOST:PORT" or a list of them')
    if not value:
        raise ConfigError(f"{where}: name at least one server")
    if len(value) > MAX_SERVERS:
        raise ConfigError(f"{where}: at most {MAX_SERVERS} servers, not {len(value)}")
    servers: list[Address] = []
    seen: set[tuple[str, int]] = set()
    for i, text in enumerate(value):
        address = parse_address(text, f"{where}[{i}]", dial=True)
        key = (_same_host(address.host), address.port)
        if key in seen:
            raise ConfigError(f"{where}[{i}]: {text!r} is already listed")
        seen.add(key)
        servers.append(address)
    return tuple(servers)


def _server_name(table: Table) -> str | None:
    if "server_name" not in table.data:
        table.seen.add("server_name")
        return None
    name = table.string("server_name")
    if not valid_hostname(name):
        raise ConfigError(
            f"{table.path('server_name')}: {name[:80]!r} is not a DNS name"
            " (labels of 1-63 letters, digits, '-' or '_', no empty label)"
        )
    return name


def _sni(server_name: str | None, upstream: Address) -> bytes | None:
    """The SNI to send: server_name, else the upstream's DNS name; none for an IP upstream."""
    name = server_name or upstream.host.removesuffix(".")
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        return name.encode("idna")  # valid_hostname has checked that this encodes


def _federated(static: Table, base: Path, own: TrustDomain) -> tuple[tuple[TrustDomain, Path], ...]:
    """`federated = { "b.example" = "b-bundle.pem" }`: trust domain -> its bundle file."""
    value = static.get("federated", {})
    where = static.path("federated")
    if not isinstance(value, Mapping):
        raise ConfigError(f'{where}: expected a table such as {{ "b.example" = "b.pem" }}')
    out: list[tuple[TrustDomain, Path]] = []
    for name, path in value.items():
        try:
            td = TrustDomain.parse(name)
        except MeshIdError as exc:
            raise ConfigError(f"{where}.{name}: {exc.message}") from None
        if td == own:
            raise ConfigError(f"{where}.{name}: is this sidecar's own trust domain")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where}.{name}: expected the path of a PEM bundle")
        out.append((td, base / path))
    return tuple(out)


def parse_config(doc: Mapping[str, Any], base: Path = Path()) -> SidecarConfig:
    """Build the config from a parsed TOML document; relative paths are taken from `base`."""
    top = Table(doc, "", TOP_KEYS)
    try:
        td = TrustDomain.parse(top.string("trust_domain"))
    except MeshIdError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"trust_domain: {exc.message}") from None
    identity = _id(top, "identity", td)

    static = top.table("static", STATIC_KEYS)
    authority = top.table("authority", AUTHORITY_KEYS)
    source: StaticSource | AuthoritySource
    if (static is None) == (authority is None):
        raise ConfigError("config: give exactly one of [static] or [authority]")
    if static is not None:
        source = StaticSource(
            cert=base / static.string("cert"),
            key=base / static.string("key"),
            bundle=base / static.string("bundle"),
            policy=static.path_value("policy", base, optional=True),
            federated=_federated(static, base, td),
        )
        static.done()
    else:
        assert authority is not None
        source = AuthoritySource(
            servers=_servers(authority),
            bundle=base / authority.string("bundle"),
            token_file=authority.path_value("token_file", base, optional=True),
            state_dir=base / authority.string("state_dir"),
            jwt_file=authority.path_value("jwt_file", base, optional=True),
        )
        if source.token_file is not None and source.jwt_file is not None:
            raise ConfigError(
                f"{authority.path('jwt_file')}: give token_file or jwt_file, not both"
            )
        authority.done()

    inbound = []
    for table in tables(top.get("inbound"), "inbound", INBOUND_KEYS):
        inbound.append(
            Inbound(
                listen=parse_address(table.required("listen"), table.path("listen")),
                forward=parse_address(table.required("forward"), table.path("forward"), dial=True),
                proxy_protocol=table.boolean("proxy_protocol", False),
            )
        )
        table.done()
    outbound = []
    for table in tables(top.get("outbound"), "outbound", OUTBOUND_KEYS):
        upstream = parse_address(table.required("upstream"), table.path("upstream"), dial=True)
        server_name = _server_name(table)
        outbound.append(
            Outbound(
                listen=parse_address(table.required("listen"), table.path("listen")),
                upstream=upstream,
                identity=_upstream_id(table, td),
                server_name=server_name,
                sni=_sni(server_name, upstream),
            )
        )
        table.done()
    if not inbound and not outbound and "workload_api" not in doc and "transparent" not in doc:
        raise ConfigError(
            "config: no [inbound] or [[outbound]] listener (nor [workload_api] or [transparent])"
        )
    transparent_table = top.table("transparent", TRANSPARENT_KEYS)
    transparent = parse_transparent(transparent_table) if transparent_table is not None else None

    admin_table = top.table("admin", ADMIN_KEYS)
    admin = None
    if admin_table is not None:
        admin = parse_address(admin_table.required("listen"), admin_table.path("listen"))
        admin_table.done()

    limits = Limits()
    limits_table = top.table("limits", LIMITS_KEYS)
    if limits_table is not None:
        limits = Limits(
            handshake_timeout=limits_table.seconds("handshake_timeout", limits.handshake_timeout),
            idle_timeout=limits_table.seconds("idle_timeout", limits.idle_timeout),
            connect_timeout=limits_table.seconds("connect_timeout", limits.connect_timeout),
            drain_timeout=limits_table.seconds("drain_timeout", limits.drain_timeout),
            max_connections=limits_table.integer("max_connections", limits.max_connections),
            close_on_peer_expiry=limits_table.boolean(
                "close_on_peer_expiry", limits.close_on_peer_expiry
            ),
            clock_skew=limits_table.seconds("clock_skew", limits.clock_skew),
            quarantine_failures=limits_table.integer(
                "quarantine_failures", limits.quarantine_failures, minimum=0
            ),
            quarantine_address_failures=limits_table.integer(
                "quarantine_address_failures", limits.quarantine_address_failures, minimum=0
            ),
            quarantine_window=limits_table.seconds("quarantine_window", limits.quarantine_window),
            quarantine_period=limits_table.seconds("quarantine_period", limits.quarantine_period),
        )
        limits_table.done()

    wa_table = top.table("workload_api", WORKLOAD_API_KEYS)
    workload_api = parse_workload_api(wa_table, base) if wa_table is not None else None

    log_table = top.table("log", LOG_KEYS)
    log_file = None
    if log_table is not None:
        log_file = log_table.path_value("file", base, optional=True)
        log_table.done()
    top.done()
    return SidecarConfig(
        identity=identity,
        trust_domain=td,
        source=source,
        inbound=tuple(inbound),
        outbound=tuple(outbound),
        admin=admin,
        limits=limits,
        log_file=log_file,
        workload_api=workload_api,
        transparent=transparent,
    )


def load_config(path: Path) -> SidecarConfig:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(doc, path.parent)


def parse_policy_file(
    doc: Mapping[str, Any], td: TrustDomain, federated: Collection[TrustDomain] = ()
) -> list[tuple[str, str]]:
    """The static allow-list: ``[[allow]] from = "web" to = "api"``, as rule ends.

    Either end may be a prefix (``ns/prod/*``, see `meshid.policy`), and either
    may be a full ID of a federated trust domain.
    """
    top = Table(doc, "", POLICY_FILE_KEYS)
    rules = []
    for table in tables(top.get("allow"), "allow", ALLOW_KEYS):
        rules.append(
            (_rule_end(table, "from", td, federated), _rule_end(table, "to", td, federated))
        )
        table.done()
    top.done()
    return rules


def _rule_end(
    table: Table, name: str, td: TrustDomain, federated: Collection[TrustDomain] = ()
) -> str:
    text = table.string(name)
    try:
        return resolve_rule_end(text, td, federated)
    except MeshIdError as exc:
        raise ConfigError(f"{table.path(name)}: {exc.message}") from None

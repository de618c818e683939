"""The authority database's schema, and the migrations from each older version."""

from __future__ import annotations

SCHEMA_VERSION = 5  # kept in PRAGMA user_version; 0 there is a version-1 database

# Enrollment by platform identity (version 4): JWT attestors, and the JWTs used so far.
# IF NOT EXISTS: a database whose version was set back still migrates.
_ATTESTOR_TABLES = """
CREATE TABLE IF NOT EXISTS attestors (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,                        -- meshid.jwtattest.Attestor as JSON
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS used_jwts (
    hash TEXT PRIMARY KEY,                     -- sha256 of an enrollment JWT: each is used once
    attestor TEXT NOT NULL,
    spiffe_id TEXT NOT NULL,
    serial TEXT NOT NULL,                      -- the SVID it was traded for
    pod_uid TEXT,
    subject TEXT NOT NULL,
    used_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
"""

# Transparent interception (version 5): the map from address to the identity serving it,
# fed by `meshid service add` and by the addresses inbound sidecars advertise.
_SERVICE_TABLES = """
CREATE TABLE IF NOT EXISTS services (
    host TEXT NOT NULL,                        -- an IP literal, as SO_ORIGINAL_DST gives it
    port INTEGER NOT NULL,
    spiffe_id TEXT NOT NULL,
    origin TEXT NOT NULL CHECK (origin IN ('operator', 'advertised')),
    created_at REAL NOT NULL,
    PRIMARY KEY (host, port, spiffe_id, origin)
);
"""

_SCHEMA = """
CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE roots (
    generation INTEGER PRIMARY KEY,
    cert_pem TEXT NOT NULL,
    key_file TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('next', 'active', 'retiring', 'retired')),
    not_after REAL NOT NULL,
    created_at REAL NOT NULL,
    activate_at REAL,
    published_sequence INTEGER,                -- the bundle sequence that first held it
    wait_for_acks INTEGER NOT NULL DEFAULT 1   -- activate only once live sidecars hold it
);
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    dns TEXT NOT NULL,
    ips TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
);
CREATE TABLE policy (
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (source, target)
);
CREATE TABLE revocations (spiffe_id TEXT PRIMARY KEY, revoked_at REAL NOT NULL);
CREATE TABLE svids (
    serial TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    generation INTEGER NOT NULL,
    not_after REAL NOT NULL,
    issued_at REAL NOT NULL,
    how TEXT NOT NULL
);
CREATE INDEX svids_by_generation ON svids (generation, not_after);
CREATE TABLE reports (
    spiffe_id TEXT NOT NULL,                   -- from the client certificate, never the body
    instance TEXT NOT NULL,                    -- one running sidecar of that identity
    seen_at REAL NOT NULL,
    report TEXT NOT NULL,
    PRIMARY KEY (spiffe_id, instance)
);
CREATE INDEX reports_by_seen ON reports (seen_at);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    action TEXT NOT NULL,
    details TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
"""
_SCHEMA += _ATTESTOR_TABLES + _SERVICE_TABLES

# Each step takes a database from the version before it to its own version, in
# the same transaction that records the new version.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: (  # reports keyed by (identity, instance): one identity cannot replace another's
        """CREATE TABLE reports_v2 (
            spiffe_id TEXT NOT NULL,
            instance TEXT NOT NULL,
            seen_at REAL NOT NULL,
            report TEXT NOT NULL,
            PRIMARY KEY (spiffe_id, instance)
        )""",
        "INSERT INTO reports_v2 (spiffe_id, instance, seen_at, report) "
        "SELECT spiffe_id, instance, seen_at, report FROM reports",
        "DROP TABLE reports",
        "ALTER TABLE reports_v2 RENAME TO reports",
        "CREATE INDEX reports_by_seen ON reports (seen_at)",
        "UPDATE settings SET value = '2' WHERE name = 'schema_version'",
    ),
    3: (  # the audit chain under a key kept outside the database (see _key_audit_chain)
        "UPDATE settings SET value = '3' WHERE name = 'schema_version'",
    ),
    4: (  # enrollment by platform identity: JWT attestors, and the JWTs used so far
        *(t for t in _ATTESTOR_TABLES.split(";") if t.strip()),
        "UPDATE settings SET value = '4' WHERE name = 'schema_version'",
    ),
    5: (  # transparent interception: the address map
        *(t for t in _SERVICE_TABLES.split(";") if t.strip()),
        "UPDATE settings SET value = '5' WHERE name = 'schema_version'",
    ),
}

COUNTERS = ("policy_version", "revocation_version", "bundle_sequence")

"""The authority database's schema, and the migrations from each older version."""

from __future__ import annotations

SCHEMA_VERSION = 12  # SQLite: PRAGMA user_version (0 is version 1); PostgreSQL: settings

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

# The operators the control plane takes management calls from (version 5).
_OPERATOR_TABLES = """
CREATE TABLE IF NOT EXISTS operators (
    spiffe_id TEXT PRIMARY KEY,                -- spiffe://TD/meshid/operator/NAME
    added_at REAL NOT NULL
);
"""

# Revocation of single SVIDs by serial (version 6), beside revocation by identity.
_SERIAL_REVOCATIONS = """
CREATE TABLE IF NOT EXISTS revoked_serials (
    serial TEXT PRIMARY KEY,                   -- lowercase hex, as svids.serial
    spiffe_id TEXT NOT NULL,
    revoked_at REAL NOT NULL
);
"""

# Federation (version 7): the foreign trust domains trusted, each with its last good bundle.
_FEDERATION_TABLES = """
CREATE TABLE IF NOT EXISTS federated_domains (
    trust_domain TEXT PRIMARY KEY,
    url TEXT NOT NULL,                         -- its SPIFFE bundle endpoint (https_spiffe)
    endpoint_id TEXT NOT NULL,                 -- the SPIFFE ID that endpoint authenticates as
    bundle TEXT NOT NULL,                      -- the last good bundle, SPIFFE JSON
    sequence INTEGER NOT NULL,
    fetched_at REAL,                           -- the last good fetch (NULL: bootstrap only)
    next_refresh REAL NOT NULL,
    failures INTEGER NOT NULL DEFAULT 0,       -- failed fetches since the last good one
    last_error TEXT,                           -- reason of the last failed fetch
    created_at REAL NOT NULL
);
"""

# Transparent interception (version 8): the map from address to the identity serving it,
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

# Several instances of one trust domain (version 9): each signs with a root of its own,
# kept in its own state directory; `roots.instance` names it ('' on an embedded authority).
_INSTANCE_TABLES = """
CREATE TABLE IF NOT EXISTS instances (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    last_heard REAL                            -- refreshed by its `ca serve`
);
"""

# The allow-list's recent changes (version 10), so that the feed can send a sidecar the
# changes since the version it holds instead of its whole list (ca.access bounds it);
# and the allow-list indexed for the feed's queries, which must not scan 100,000 rules.
_POLICY_HISTORY = """
CREATE TABLE IF NOT EXISTS policy_changes (
    version INTEGER NOT NULL,                  -- the policy version the change made
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    added INTEGER NOT NULL                     -- 1: allowed from then on, 0: removed
);
CREATE INDEX IF NOT EXISTS policy_changes_by_version ON policy_changes (version);
CREATE INDEX IF NOT EXISTS policy_by_target ON policy (target);
CREATE INDEX IF NOT EXISTS policy_prefixed ON policy (source, target)
    WHERE source LIKE '%/*' OR target LIKE '%/*';
"""

# The public JWT-SVID keys of every instance (version 11): each instance signs with keys
# kept in its own state directory and publishes their public halves here, so that every
# instance serves every instance's keys. Private keys never enter the database.
_JWT_KEY_TABLES = """
CREATE TABLE IF NOT EXISTS jwt_keys (
    kid TEXT PRIMARY KEY,                      -- RFC 7638 thumbprint
    instance TEXT NOT NULL,                    -- the instance that signs with it
    jwk TEXT NOT NULL,                         -- the public JWK, as the bundle lists it
    created_at REAL NOT NULL,
    leave_at REAL                              -- its instance was removed: served until then
);
"""

# Bounding renewals (version 12): each identity's renewal budget, a token bucket every
# worker and instance spends from; and indexes to prune SVID records that expired long
# ago, the oldest found by expiry, each identity's newest (kept) by identity (ca.issuance).
_RENEWAL_TABLES = """
CREATE TABLE IF NOT EXISTS renewal_budgets (
    spiffe_id TEXT PRIMARY KEY,
    tokens REAL NOT NULL,                      -- renewals left at `at` (meshid.ratelimit)
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS svids_by_expiry ON svids (not_after);
CREATE INDEX IF NOT EXISTS svids_by_identity ON svids (spiffe_id, not_after);
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
    wait_for_acks INTEGER NOT NULL DEFAULT 1,  -- activate only once live sidecars hold it
    instance TEXT NOT NULL DEFAULT ''          -- the instance whose state directory holds the key
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
_SCHEMA += _ATTESTOR_TABLES
_SCHEMA += _OPERATOR_TABLES
_SCHEMA += _SERIAL_REVOCATIONS
_SCHEMA += _FEDERATION_TABLES
_SCHEMA += _SERVICE_TABLES
_SCHEMA += _INSTANCE_TABLES
_SCHEMA += _POLICY_HISTORY
_SCHEMA += _JWT_KEY_TABLES
_SCHEMA += _RENEWAL_TABLES

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
    5: (  # operators: who may manage the mesh through the control plane
        *(t for t in _OPERATOR_TABLES.split(";") if t.strip()),
        "UPDATE settings SET value = '5' WHERE name = 'schema_version'",
    ),
    6: (  # revocation of one SVID by its serial
        *(t for t in _SERIAL_REVOCATIONS.split(";") if t.strip()),
        "UPDATE settings SET value = '6' WHERE name = 'schema_version'",
    ),
    7: (  # federation: foreign trust domains and their last good bundles
        *(t for t in _FEDERATION_TABLES.split(";") if t.strip()),
        "UPDATE settings SET value = '7' WHERE name = 'schema_version'",
    ),
    8: (  # transparent interception: the address map
        *(t for t in _SERVICE_TABLES.split(";") if t.strip()),
        "UPDATE settings SET value = '8' WHERE name = 'schema_version'",
    ),
    9: (  # instances: each signs with its own root (roots.instance: see ADDED_COLUMNS)
        *(t for t in _INSTANCE_TABLES.split(";") if t.strip()),
        "UPDATE settings SET value = '9' WHERE name = 'schema_version'",
    ),
    10: (  # the allow-list's recent changes, for deltas; its history starts now
        *(t for t in _POLICY_HISTORY.split(";") if t.strip()),
        "INSERT INTO counters (name, value) SELECT 'policy_history_floor', "
        "COALESCE(MAX(value), 0) FROM counters WHERE name = 'policy_version' "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        "UPDATE settings SET value = '10' WHERE name = 'schema_version'",
    ),
    11: (  # every instance's public JWT-SVID keys, for each to serve all
        *(t for t in _JWT_KEY_TABLES.split(";") if t.strip()),
        "UPDATE settings SET value = '11' WHERE name = 'schema_version'",
    ),
    12: (  # renewal budgets; indexes to prune SVID records that expired long ago
        *(t for t in _RENEWAL_TABLES.split(";") if t.strip()),
        "UPDATE settings SET value = '12' WHERE name = 'schema_version'",
    ),
}

# Columns a step adds to an existing table, added only where missing: a database whose
# version was set back already has them.
ADDED_COLUMNS: dict[int, tuple[tuple[str, str, str], ...]] = {
    9: (("roots", "instance", "TEXT NOT NULL DEFAULT ''"),),
}

COUNTERS = ("policy_version", "revocation_version", "bundle_sequence")

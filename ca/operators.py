"""The operator list: identities the control plane takes management calls from.

Each one is `spiffe://TD/meshid/operator/NAME` (nothing else under the
reserved `/meshid/` path is a person). Adding and removing are audited;
every call an operator makes through the control plane is audited with
its ID (see `ca.adminapi`).
"""

from __future__ import annotations

from ca.authority_base import AuthorityBase
from ca.db import Conflict
from ca.values import is_operator_id
from meshid.errors import InvalidInput, PolicyError
from meshid.spiffeid import SpiffeId


def check_operator_id(spiffe_id: SpiffeId, trust_domain: object) -> SpiffeId:
    if spiffe_id.trust_domain != trust_domain or not is_operator_id(spiffe_id):
        raise InvalidInput(
            f"{spiffe_id}: an operator ID is spiffe://<this trust domain>/meshid/operator/NAME",
            reason="invalid_operator_id",
        )
    return spiffe_id


class Operators(AuthorityBase):
    def operator_add(self, spiffe_id: SpiffeId) -> None:
        check_operator_id(spiffe_id, self.trust_domain)
        now = self._now().timestamp()
        with self.store.write() as conn:
            try:
                conn.execute(
                    "INSERT INTO operators (spiffe_id, added_at) VALUES (?, ?)",
                    (str(spiffe_id), now),
                )
            except Conflict:
                raise PolicyError(
                    f"{spiffe_id} is already an operator", reason="already_operator"
                ) from None
            self.store.audit(conn, now, "operator_add", spiffe_id=str(spiffe_id))

    def operator_remove(self, spiffe_id: SpiffeId) -> None:
        now = self._now().timestamp()
        with self.store.write() as conn:
            cursor = conn.execute("DELETE FROM operators WHERE spiffe_id = ?", (str(spiffe_id),))
            if cursor.rowcount == 0:
                raise PolicyError(f"{spiffe_id} is not an operator", reason="unknown_operator")
            self.store.audit(conn, now, "operator_remove", spiffe_id=str(spiffe_id))

    def operators(self) -> list[SpiffeId]:
        with self.store.read() as conn:
            rows = conn.execute("SELECT spiffe_id FROM operators ORDER BY spiffe_id").fetchall()
        return [SpiffeId.parse(s) for (s,) in rows]

    def audit_call(self, operator: SpiffeId, path: str, **details: object) -> None:
        """One audit row for a call that changed nothing (a read, a refusal, a no-op)."""
        now = self._now().timestamp()
        with self.store.write() as conn:
            self.store.audit(
                conn, now, "operator_call", operator=str(operator), call=path, **details
            )

    def is_operator(self, spiffe_id: SpiffeId) -> bool:
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT 1 FROM operators WHERE spiffe_id = ?", (str(spiffe_id),)
            ).fetchone()
        return row is not None

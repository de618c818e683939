"""The authority refreshing federated bundles on their refresh hint, while it serves.

Each federated trust domain is fetched when its `next_refresh` has come
(the refresh hint after a good fetch; doubled per failure, see
ca.federation.backoff). A failure keeps the last good bundle and is logged
with its reason; a new bundle bumps the policy version, so sidecars get it
through their feed. One fetch at a time, each bounded in time. Every instance
of a trust domain refreshes; a fetch overtaken by another instance's newer one
is dropped quietly (`record_fetch`'s `seen`), not counted as a failure.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import trio

from ca.federation_fetch import fetch_bundle
from ca.server import ControlPlane
from meshid.bundle import TrustBundle
from meshid.errors import MeshIdError

CHECK_INTERVAL = 1.0  # seconds between looks at which bundles are due


async def refresh_federated_bundles(
    plane: ControlPlane,
    log: Callable[..., None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Refresh each federated bundle when due, until cancelled."""
    authority = plane.authority
    task_status.started()
    while True:
        try:
            due = [
                f
                for f in await plane.db_call(authority.federations)
                if f.next_refresh <= authority.clock_now()
            ]
            for f in due:
                fetched: TrustBundle | MeshIdError
                try:
                    fetched = await fetch_bundle(f.url, f.endpoint_id, f.bundle)
                except MeshIdError as exc:
                    fetched = exc
                after = await plane.db_call(
                    partial(authority.record_fetch, f.trust_domain, fetched, seen=f.bundle)
                )
                if after.last_error is not None:
                    log(
                        "federation_refresh_failed",
                        reason=after.last_error,
                        trust_domain=f.trust_domain.name,
                        failures=after.failures,
                        keeping_sequence=after.bundle.sequence,
                        detail=fetched.message if isinstance(fetched, MeshIdError) else None,
                    )
                elif after.bundle.sequence != f.bundle.sequence:
                    log(
                        "federation_bundle",
                        trust_domain=f.trust_domain.name,
                        sequence=after.bundle.sequence,
                        roots=len(after.bundle.roots),
                    )
        except MeshIdError as exc:  # the database busy or gone: try again next round
            log("federation_refresh_failed", reason=exc.reason, detail=exc.message)
        await trio.sleep(CHECK_INTERVAL)

"""Failure boundaries for the sidecar's long-running background duties.

A duty (the sweep of live connections, the static file watcher, the dynamic
identity's loops) runs for the life of the sidecar. A bug or an unforeseen
failure in one of them must not end the process and must not end the duty
either: `keep_running` logs it once as `internal_error` (the exception's
type only: its text may quote a path or a certificate), at most once per
second per duty with a count of the lines held back, pauses briefly, and
runs the duty again. Only `Exception` is caught: `trio.Cancelled` (and a
group holding one) goes on up. Our own errors (`MeshIdError`) go on up too:
they are the duty saying the sidecar cannot go on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from adminhttp import Throttle
from meshid.errors import MeshIdError
from meshid.reasons import Reason
from sidecar.events import EventLog

TASK_PAUSE = 1.0  # seconds a duty rests after an unexpected failure, before it runs again


async def keep_running(
    task: str,
    duty: Callable[[], Awaitable[None]],
    events: EventLog,
    throttle: Throttle,
    pause: float | None = None,
) -> None:
    """Run `duty` until it returns; an unexpected failure is logged and the duty runs again."""
    while True:
        try:
            await duty()
            return
        except MeshIdError:
            raise
        except Exception as exc:
            held = throttle.allow(f"{Reason.INTERNAL_ERROR}:{task}")
            if held is not None:
                events.emit(
                    Reason.INTERNAL_ERROR,
                    reason=Reason.INTERNAL_ERROR,
                    task=task,
                    error=type(exc).__name__,
                    suppressed=held or None,
                )
        await trio.sleep(TASK_PAUSE if pause is None else pause)

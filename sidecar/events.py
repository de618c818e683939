"""The sidecar's decision log is the shared JSON-lines event log (`meshid.events`)."""

from meshid.events import EventLog, utcnow

__all__ = ["EventLog", "utcnow"]

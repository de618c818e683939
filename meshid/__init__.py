"""meshid: zero-trust workload identity for microservices.

This package is the shared kernel that the authority (`ca`) and the sidecar
(`sidecar`) both build on: SPIFFE IDs, durations, the X.509-SVID profile,
trust bundles, allow-list decisions, the error tree and the root command group.
It does no I/O beyond what its callers hand it.
"""

__version__ = "0.1.0"

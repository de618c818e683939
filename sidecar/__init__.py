"""The meshid sidecar: an mTLS proxy that admits only allowed SPIFFE peers."""

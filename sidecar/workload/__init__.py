"""The SPIFFE Workload API on the sidecar: a small gRPC server on a Unix socket."""

"""`make bench`: meshid's sidecars against direct TCP and stunnel, on this machine.

`python -m bench.run` starts every process it measures (backends, proxies,
load generators) on 127.0.0.1, runs each workload a few times, profiles the
sidecars with py-spy, and writes `bench/RESULTS.md`. Modules:

- `procs`: start and stop processes by pid, read their CPU time and RSS.
- `topology`: certificates, backends, and the chains under test (direct,
  meshid, stunnel), each a context manager that stops what it started.
- `workloads`: one class per workload; adding a workload is adding a class
  to `WORKLOADS` (and, if it needs other processes, a topology).
- `profiling`: py-spy record around one extra repetition, summarised.
- `report`: medians, ratios, targets, and the Markdown.

`make bench` then prints three measurements of one process each, with
their commands: `idle_rss` (a sidecar's memory, idle, in each mode),
`rejudge` (a policy change over 20,000 live connections) and
`policy_decision` (a decision with 10 to 100,000 rules).
"""

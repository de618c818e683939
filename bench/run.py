"""`python -m bench.run`: run every workload on every topology, profile, write RESULTS.md.

Bounded: each load generator has a timeout, each repetition a fixed size or
duration, and every process started here is stopped by pid when the run
ends, whichever way it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench.procs import BenchError, Supervisor, raise_nofile
from bench.profiling import py_spy_path, record, summarise
from bench.topology import TOPOLOGIES, Chain, Env, make_certs, start_backends
from bench.workloads import WORKLOADS, Workload


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _loadavg() -> str:
    with open("/proc/loadavg", encoding="ascii") as f:
        return " / ".join(f.read().split()[:3])


def _failed(result: report.WorkloadResult, what: str, topo: str, exc: BenchError) -> None:
    _log(f"{what} {topo} FAILED: {exc}")
    result.errors[topo] = str(exc).splitlines()[0]


def run_workload(
    w: Workload, env: Env, reps: int, profile: bool, outdir: Path
) -> report.WorkloadResult:
    """Every repetition of every topology. Repetitions are interleaved (A B C, then B C A,
    ...) with all chains up at once, so load from other work on the machine, which drifts
    over minutes, falls on every topology alike rather than on whichever ran last."""
    result = report.WorkloadResult(w)
    if w.fresh_per_rep:
        for topo in w.topologies:
            samples = result.samples.setdefault(topo, [])
            try:
                for rep in range(reps):
                    with TOPOLOGIES[topo](env) as chain:
                        result.commands.setdefault(topo, w.commands(chain))
                        result.chain_commands.setdefault(topo, chain.commands)
                        samples.append(w.measure(chain, env))
                        _log(f"{w.name} {topo} rep {rep + 1}: {samples[-1].values}")
            except BenchError as exc:
                _failed(result, w.name, topo, exc)
        return result
    with contextlib.ExitStack() as stack:
        chains: dict[str, Chain] = {}
        for topo in w.topologies:
            try:
                chain = stack.enter_context(TOPOLOGIES[topo](env))
                result.commands.setdefault(topo, w.commands(chain))
                result.chain_commands.setdefault(topo, chain.commands)
                w.warmup(chain, env)
                chains[topo] = chain
            except BenchError as exc:
                _failed(result, w.name, topo, exc)
        for rep in range(reps):
            order = list(chains)
            turn = rep % len(order) if order else 0
            for topo in order[turn:] + order[:turn]:
                try:
                    sample = w.measure(chains[topo], env)
                except BenchError as exc:
                    _failed(result, w.name, topo, exc)
                    del chains[topo]
                    continue
                result.samples.setdefault(topo, []).append(sample)
                _log(f"{w.name} {topo} rep {rep + 1}: {sample.values}")
        if profile:
            for topo, chain in chains.items():
                if not chain.python:
                    continue
                try:
                    with record(chain, outdir, w.name) as files:
                        profiled = w.measure(chain, env)
                except BenchError as exc:
                    _log(f"{w.name} {topo} profiled run FAILED: {exc}")
                    continue
                _log(f"{w.name} {topo} profiled run: {profiled.values}")
                result.profiled[topo] = profiled
                for role, path in files.items():
                    if path.exists():
                        result.profiles.setdefault(topo, []).append(summarise(role, path))
    return result


def runnable(workloads: list[Workload]) -> tuple[list[Workload], dict[str, list[str]]]:
    """The workloads this machine can run, and the others' names under the reason why not."""
    selected: list[Workload] = []
    skipped: dict[str, list[str]] = {}
    for w in workloads:
        why = w.unavailable()
        if why is None:
            selected.append(w)
        else:
            skipped.setdefault(why, []).append(w.name)
    return selected, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per figure (median)")
    parser.add_argument("--only", nargs="*", help="workload names to run (default: all)")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy runs")
    parser.add_argument("--out", type=Path, default=Path("bench/RESULTS.md"))
    parser.add_argument("--workdir", type=Path, help="keep logs and profiles here")
    args = parser.parse_args(argv)

    nofile = raise_nofile()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="meshid-bench-", dir=args.workdir))
    venv_bin = Path(sys.executable).parent
    profile = not args.no_profile and py_spy_path() is not None
    if not args.no_profile and not profile:
        _log("py-spy not found: figures without profiles")
    selected, skipped = runnable([w for w in WORKLOADS if not args.only or w.name in args.only])
    run = report.RunResult(reps=args.reps, nofile=nofile, workdir=workdir, skipped=skipped)
    for why, names in skipped.items():
        _log(f"{', '.join(names)}: skipped: {why}")
    started = time.monotonic()
    run.load_before = _loadavg()
    _log(f"work directory {workdir}, RLIMIT_NOFILE {nofile}")
    with Supervisor(workdir) as sup:
        env = Env(workdir, venv_bin / "meshid", Path(sys.executable), sup)
        run.setup_commands = make_certs(env)
        run.backend_commands = start_backends(env)
        for w in selected:
            _log(f"workload {w.name}: {w.title}")
            run.workloads.append(run_workload(w, env, args.reps, profile, workdir))
    run.seconds = time.monotonic() - started
    for line in report.summary(run):
        _log(line)
    run.load_after = _loadavg()
    # Commands name the venv by its path from the project root, as `make bench` runs them.
    text = report.render(run).replace(f"{Path.cwd().resolve()}/", "")
    args.out.write_text(text)
    _log(f"wrote {args.out} after {run.seconds:.0f}s")
    return 1 if any(r.errors for r in run.workloads) else 0


if __name__ == "__main__":
    sys.exit(main())

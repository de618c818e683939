"""Idle sidecar bench: the resident memory of a sidecar that has started and carries nothing.

    python -m bench.idle_rss [--workdir DIR] [--settle 2]

Makes an authority (`meshid ca init`), then starts one sidecar in each mode
and reads its VmRSS (/proc/PID/status) once it has logged `started` and its
RSS has held still for `--settle` seconds (bounded):

- static: certificate, key, bundle and policy from files;
- control plane: enrolled with a join token at a running `meshid ca serve`,
  following its feed;
- transparent: the same with `[transparent]` listeners (the nftables rules
  are not installed: they change nothing an idle sidecar holds).

Each sidecar is stopped by its pid before the next starts; the authority
last. Prints one line per mode with the exact command. The target is
≤ 30 MiB; ghostunnel idles at about 25 MiB.

The baseline, measured the same way in the same run, is a Python process
that imports only the third-party libraries a sidecar loads (trio, pyOpenSSL
and cryptography with their OpenSSL, h11, prometheus_client, click, ...) and
waits: the floor no Python sidecar on these libraries can go below. Each
mode's line gives its ratio to that floor, and its private memory (USS, from
/proc/PID/smaps_rollup): what one more sidecar on the same host costs, the
libraries' shared pages aside.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import BenchError, Proc, Supervisor, free_ports, rss_kib, wait_listening

TARGET_MIB = 30.0

# Run in a child: the third-party top-level packages that the sidecar's code loads.
_LIBRARIES_OF_A_SIDECAR = (
    "import sys; std = set(sys.stdlib_module_names); import meshid.cli, sidecar.app; "
    "ours = {'meshid', 'sidecar', 'adminhttp', '__main__'}; "
    "tops = {m.split('.')[0] for m in sys.modules} - std - ours; "
    "print(' '.join(sorted(m for m in tops if not m.startswith('_'))))"
)
_IMPORT_AND_WAIT = (
    "import importlib, signal, sys\n"
    "for name in sys.argv[1:]:\n"
    "    importlib.import_module(name)\n"
    'print(\'"event":"started"\', flush=True)\n'
    "signal.pause()\n"
)


def _output(argv: list[str], what: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise BenchError(f"{what}: {done.stderr.strip()}")
    return done.stdout


def _meshid(*args: str) -> str:
    meshid = str(Path(sys.executable).parent / "meshid")
    return _output([meshid, *args], f"meshid {' '.join(args)}")


def _wait_started(proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while b'"event":"started"' not in proc.log.read_bytes():
        proc.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"{proc.name} never logged started")
        time.sleep(0.05)


def _settled_rss(proc: Proc, settle: float) -> int:
    """VmRSS once it has not moved for `settle` seconds (at most ten tries)."""
    last = rss_kib(proc.pid)
    for _ in range(10):
        time.sleep(settle)
        now = rss_kib(proc.pid)
        if now == last:
            return now
        last = now
    return last


def _uss_kib(pid: int) -> int:
    """Private (unshared) resident memory: Private_Clean + Private_Dirty."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def _libraries() -> list[str]:
    argv = [sys.executable, "-c", _LIBRARIES_OF_A_SIDECAR]
    return _output(argv, "cannot list the sidecar's libraries").split()


def _configs(d: Path, server: str) -> dict[str, str]:
    ca = d / "ca"
    _meshid("ca", "issue", "web", "--out", str(d / "web"), "--state", str(ca))
    (d / "policy.toml").write_text('[[allow]]\nfrom = "api"\nto = "web"\n')
    (d / "bundle.pem").write_text(_meshid("ca", "bundle", "--state", str(ca)))
    backend, inbound, admin, out_port, in_port = free_ports(5)
    common = (
        f'trust_domain = "example.org"\n\n[[inbound]]\nlisten = "127.0.0.1:{inbound}"\n'
        f'forward = "127.0.0.1:{backend}"\n\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
    )
    static = (
        f'identity = "web"\n{common}\n[static]\ncert = "{d}/web/svid.pem"\n'
        f'key = "{d}/web/svid.key"\nbundle = "{d}/web/bundle.pem"\npolicy = "{d}/policy.toml"\n'
    )

    def dynamic(name: str) -> str:
        (d / f"{name}.token").write_text(_meshid("ca", "token", name, "--state", str(ca)).strip())
        return (
            f'identity = "{name}"\n{common}\n[authority]\nserver = "{server}"\n'
            f'bundle = "{d}/bundle.pem"\ntoken_file = "{d}/{name}.token"\n'
            f'state_dir = "{d}/{name}-state"\n'
        )

    transparent = dynamic("cache") + (
        f"\n[transparent]\noutbound_port = {out_port}\ninbound_port = {in_port}\n"
        f'app_ports = [{backend}]\nadvertise = ["127.0.0.1:{backend}"]\n'
    )
    configs = {"static": static, "control plane": dynamic("api"), "transparent": transparent}
    for mode, text in configs.items():
        (d / f"{mode.replace(' ', '-')}.toml").write_text(text)
    return {mode: str(d / f"{mode.replace(' ', '-')}.toml") for mode in configs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep configs and logs here")
    parser.add_argument("--settle", type=float, default=2.0)
    args = parser.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="meshid-idle-", dir=args.workdir))
    meshid = str(Path(sys.executable).parent / "meshid")
    _meshid("ca", "init", "--state", str(d / "ca"), "--trust-domain", "example.org")
    [port] = free_ports(1)
    failed = False
    with Supervisor(d) as sup:
        serve = [meshid, "ca", "serve", "--state", str(d / "ca"), "--listen", f"127.0.0.1:{port}"]
        authority = sup.start("authority", serve)
        wait_listening([authority], [port])
        print(f"authority: {' '.join(serve)}")
        libraries = _libraries()
        floor_argv = [sys.executable, "-c", _IMPORT_AND_WAIT, *libraries]
        floor = sup.start("libraries", floor_argv)
        try:
            _wait_started(floor)
            floor_kib = _settled_rss(floor, args.settle)
        finally:
            sup.stop(floor)
        print(
            f"baseline: idle RSS {floor_kib / 1024:.1f} MiB for Python importing only "
            f"the sidecar's libraries ({', '.join(libraries)})"
        )
        for mode, config in _configs(d, f"127.0.0.1:{port}").items():
            argv = [meshid, "sidecar", "run", "--config", config]
            proc = sup.start(f"sidecar-{mode.replace(' ', '-')}", argv)
            try:
                _wait_started(proc)
                kib = _settled_rss(proc, args.settle)
                uss = _uss_kib(proc.pid)
            except BenchError as exc:
                print(f"{mode}: FAILED ({str(exc).splitlines()[0]}): {' '.join(argv)}")
                failed = True
                continue
            finally:
                sup.stop(proc)
            mib = kib / 1024
            verdict = "ok" if mib <= TARGET_MIB else f"over the {TARGET_MIB:.0f} MiB target"
            print(
                f"{mode}: idle RSS {mib:.1f} MiB ({verdict}; {kib / floor_kib:.2f}x the "
                f"baseline, private {uss / 1024:.1f} MiB): {' '.join(argv)}"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""`deploy/` stays consistent with the code it deploys.

What an operator copies from `deploy/` must work with this version of meshid,
so every check here ties a manifest to the code or to another manifest:

- every YAML manifest parses, and every sidecar config (a `.toml` file or a
  ConfigMap key) passes `sidecar.config.parse_config`;
- every `meshid ...` command line, in container commands, shell scripts, unit
  files and the READMEs' code blocks, names a real click command with real
  options and valid values (parsed by click itself, nothing invoked);
- paths agree: a config's state dir, bundle and token lie on the mounts that
  provide them, `--state` is where the authority's volume is, the init guard
  tests the file the authority really creates;
- ports agree: probes and health checks hit the admin listener of the config
  the sidecar runs, Services point at the listeners, each sidecar's authority
  and upstream addresses reach a real listener of the right identity;
- names agree: Secrets and ConfigMaps a pod uses exist (in the manifests, or
  created by the README's steps, with the keys used), trust domains match the
  `ca init`, every outbound pair is allowed and every identity gets a token;
- hardening is in place: non-root, read-only root file system, no
  capabilities; the systemd units pass `systemd-analyze verify`;
- every sidecar's memory limit holds the connections its config allows;
- the root key's passphrase reaches the authority as a mounted file, never
  through the environment;
- the NetworkPolicies let only the workloads reach the authority and each
  other's mTLS port, only monitoring reach the admin port, nobody the rest.

Each checker has a negative twin showing that it can fail.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import click
import pytest
import yaml

from ca.store import DB_NAME
from meshid.cli import cli
from meshid.duration import parse_duration
from sidecar.config import AuthoritySource, Limits, SidecarConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose"
SYSTEMD = DEPLOY / "systemd"
MESHID_IMAGE = "meshid:0.1.0"
SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture(autouse=True)
def _no_state_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # --state may come from MESHID_CA_STATE; the command lines must not rely on it.
    monkeypatch.delenv("MESHID_CA_STATE", raising=False)


# -- command lines -----------------------------------------------------------


class CommandLineError(Exception):
    pass


@dataclass(frozen=True)
class Invocation:
    source: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.source}: meshid {shlex.join(self.argv)}"


@dataclass(frozen=True)
class Resolved:
    path: tuple[str, ...]  # ("ca", "serve")
    params: dict[str, Any]


def resolve(argv: tuple[str, ...] | list[str]) -> Resolved:
    """Parse `meshid ARGV` with the real click commands, without invoking anything."""
    rest = list(argv)
    command: click.Command = cli
    # The root's context_settings (`-h`) as a real run has them: click caches each
    # command's help option from the first context that parses it.
    ctx = click.Context(cli, info_name="meshid", **cli.context_settings)
    path: list[str] = []
    hidden: str | None = None  # a default subcommand the command line does not name
    while isinstance(command, click.Group):
        where = " ".join(["meshid", *path])
        default = getattr(command, "default_command", None)  # `ca token ID` is `ca token create ID`
        if default is not None and (
            not rest or rest[0].startswith("-") or command.get_command(ctx, rest[0]) is None
        ):
            rest.insert(0, default)
            hidden = default
        if not rest or rest[0].startswith("-"):
            raise CommandLineError(f"'{where}' is a group: a subcommand is missing")
        name = rest.pop(0)
        sub = command.get_command(ctx, name)
        if sub is None:
            raise CommandLineError(f"'{where}' has no command {name!r}")
        path.append(name)
        command = sub
        if isinstance(command, click.Group):
            ctx = click.Context(command, info_name=name, parent=ctx)
    try:
        leaf = command.make_context(path[-1], rest, parent=ctx)
    except click.UsageError as exc:  # unknown option, missing argument, bad value
        raise CommandLineError(f"meshid {' '.join(path)}: {exc.format_message()}") from None
    params = leaf.params
    if {"state", "server"} <= params.keys() and params["state"] is params["server"] is None:
        # `--state DIR` or `--server HOST:PORT --svid DIR`: meshid refuses neither given
        raise CommandLineError(f"meshid {' '.join(path)}: needs --state DIR or --server HOST:PORT")
    return Resolved(tuple(p for p in path if p != hidden), dict(leaf.params))


_COMMAND_PREFIXES = {"--", "exec", "sudo", "env", "if", "then", "else", "do", "time", "nohup"}
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def _is_operator(token: str) -> bool:
    return bool(token) and all(c in "();<>|&!{}" for c in token)


def _is_meshid(tokens: list[str], i: int) -> bool:
    """A `meshid` token in command position (not `-n meshid`, not `useradd ... meshid`)."""
    token = tokens[i]
    if token.endswith("/bin/meshid"):
        return True
    if token != "meshid":
        return False
    if i == 0:
        return True
    prev = tokens[i - 1]
    if prev in _COMMAND_PREFIXES or _is_operator(prev) or _ASSIGNMENT.match(prev):
        return True
    return i >= 2 and tokens[i - 2] == "exec"  # docker compose exec SERVICE meshid ...


def shell_lines(script: str) -> Iterator[list[str]]:
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        if tokens:
            yield tokens


def meshid_in_script(script: str) -> list[tuple[str, ...]]:
    """The argument lists of every `meshid` run by a shell script or command line."""
    found = []
    for tokens in shell_lines(script):
        for i in range(len(tokens)):
            if not _is_meshid(tokens, i):
                continue
            argv = []
            for token in tokens[i + 1 :]:
                if _is_operator(token):
                    break
                argv.append(token)
            if argv:  # a bare `meshid` only prints help
                found.append(tuple(argv))
    return found


def meshid_in_argv(argv: list[str]) -> list[tuple[str, ...]]:
    if not argv:
        return []
    if PurePosixPath(argv[0]).name == "meshid":
        return [tuple(argv[1:])]
    if argv[0] in SHELLS and len(argv) >= 3 and argv[1] == "-c":
        return meshid_in_script(argv[2])
    return []


@functools.cache
def code_blocks(markdown: Path) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", markdown.read_text(), flags=re.DOTALL)


# -- loading -----------------------------------------------------------------


@functools.cache
def load_yaml(path: Path) -> list[Any]:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


@functools.cache
def k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in load_yaml(path)]


def k8s_find(kind: str, name: str) -> dict[str, Any] | None:
    for obj in k8s_objects():
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    return None


def compose() -> dict[str, Any]:
    [doc] = load_yaml(COMPOSE / "docker-compose.yml")
    assert isinstance(doc, dict)
    return doc


@functools.cache
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (COMPOSE / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def image_entrypoint() -> list[str]:
    [value] = [rest for word, rest in dockerfile_instructions() if word == "ENTRYPOINT"]
    entrypoint = yaml.safe_load(value)  # the exec form is a JSON array
    assert isinstance(entrypoint, list)
    return [str(x) for x in entrypoint]


@functools.cache
def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(path: Path, key: str, section: str = "Service") -> list[str]:
    return [v for k, v in parse_unit(path)[section] if k == key]


def unit_value(path: Path, key: str) -> str:
    values = unit_values(path, key)
    assert len(values) == 1, f"{path.name}: expected one {key}=, found {values}"
    return values[0]


def seconds(text: str | int) -> float:
    if isinstance(text, int) or text.isdigit():
        return float(text)
    return parse_duration(text).total_seconds()


def toml_config(text: str) -> SidecarConfig:
    return parse_config(tomllib.loads(text))


def dynamic(config: SidecarConfig) -> AuthoritySource:
    """Every example enrolls with the authority: [authority], not [static]."""
    assert isinstance(config.source, AuthoritySource), config.identity
    return config.source


# -- what runs where -----------------------------------------------------------


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (obj["metadata"]["name"], obj["spec"]["template"]["spec"])
        for obj in k8s_objects()
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
    ]


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def container_argv(container: dict[str, Any]) -> list[str]:
    command = container.get("command")
    if command is None:
        command = image_entrypoint() if container["image"] == MESHID_IMAGE else []
    return [str(x) for x in [*command, *container.get("args", [])]]


def service_argv(service: dict[str, Any]) -> list[str]:
    def as_list(value: Any) -> list[str]:
        if value is None:
            return []
        return shlex.split(value) if isinstance(value, str) else [str(x) for x in value]

    entrypoint = as_list(service.get("entrypoint"))
    if "entrypoint" not in service and service.get("image") == MESHID_IMAGE:
        entrypoint = image_entrypoint()
    return entrypoint + as_list(service.get("command"))


def unit_files() -> list[Path]:
    return sorted(SYSTEMD.glob("*.service"))


def k8s_invocations() -> list[Invocation]:
    found = []
    for pod, spec in pod_specs():
        for container in all_containers(spec):
            for argv in meshid_in_argv(container_argv(container)):
                found.append(Invocation(f"kubernetes {pod}/{container['name']}", argv))
    for block in code_blocks(K8S / "README.md"):
        found += [Invocation("kubernetes/README.md", argv) for argv in meshid_in_script(block)]
    return found


def compose_invocations() -> list[Invocation]:
    found = []
    for name, service in compose()["services"].items():
        for argv in meshid_in_argv(service_argv(service)):
            found.append(Invocation(f"compose {name}", argv))
    for block in code_blocks(COMPOSE / "README.md"):
        found += [Invocation("compose/README.md", argv) for argv in meshid_in_script(block)]
    return found


def systemd_invocations() -> list[Invocation]:
    found = []
    for unit in unit_files():
        for key in ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop"):
            for value in unit_values(unit, key):
                argv = meshid_in_script(value.lstrip("@-:+!"))
                found += [Invocation(f"{unit.name} {key}", a) for a in argv]
    for block in code_blocks(SYSTEMD / "README.md"):
        found += [Invocation("systemd/README.md", argv) for argv in meshid_in_script(block)]
    return found


FLAVOURS = {
    "kubernetes": k8s_invocations,
    "compose": compose_invocations,
    "systemd": systemd_invocations,
}


def resolved(flavour: str) -> list[Resolved]:
    return [resolve(inv.argv) for inv in FLAVOURS[flavour]()]


def only(results: list[Resolved], *path: str) -> list[Resolved]:
    return [r for r in results if r.path == path]


def the(results: list[Resolved], *path: str) -> Resolved:
    matches = only(results, *path)
    assert len(matches) == 1, f"expected one 'meshid {' '.join(path)}', found {len(matches)}"
    return matches[0]


def allowed_pairs(results: list[Resolved]) -> set[tuple[str, str]]:
    return {(r.params["source"], r.params["target"]) for r in only(results, "policy", "allow")}


def token_ids(results: list[Resolved]) -> set[str]:
    return {r.params["spiffe_id"] for r in only(results, "ca", "token")}


def option_values(params: dict[str, Any], name: str) -> list[str]:
    value = params[name]
    return [str(v) for v in value] if isinstance(value, tuple) else [str(value)]


# == every flavour ===========================================================


def test_every_yaml_manifest_parses() -> None:
    paths = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(paths) >= 5
    for path in paths:
        docs = load_yaml(path)
        assert docs, f"{path.name} is empty"
        assert all(isinstance(doc, dict) for doc in docs), path.name


def sidecar_configs() -> list[tuple[str, str]]:
    found = [(str(p.relative_to(DEPLOY)), p.read_text()) for p in sorted(DEPLOY.rglob("*.toml"))]
    for obj in k8s_objects():
        if obj["kind"] == "ConfigMap":
            for key, text in obj.get("data", {}).items():
                if key.endswith(".toml"):
                    found.append((f"ConfigMap {obj['metadata']['name']}/{key}", text))
    return found


def test_every_sidecar_config_parses() -> None:
    configs = sidecar_configs()
    # compose web+api, kubernetes web+api, systemd web
    assert len(configs) >= 5, [name for name, _ in configs]
    for name, text in configs:
        config = toml_config(text)  # raises ConfigError naming the key
        assert config.admin is not None, f"{name}: no [admin] listener for health checks"


ALL_INVOCATIONS = [inv for collect in FLAVOURS.values() for inv in collect()]


@pytest.mark.parametrize("invocation", ALL_INVOCATIONS, ids=str)
def test_every_meshid_command_line_resolves(invocation: Invocation) -> None:
    try:
        resolve(invocation.argv)
    except CommandLineError as exc:
        pytest.fail(f"{invocation.source}: {exc}")


# What each flavour must run; guards the extraction above against finding nothing.
EXPECTED_COMMANDS = {
    ("ca", "init"),
    ("ca", "serve"),
    ("ca", "token"),
    ("ca", "bundle"),
    ("policy", "allow"),
    ("sidecar", "run"),
}


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_each_flavour_runs_the_whole_bootstrap(flavour: str) -> None:
    paths = {tuple(inv.argv[:2]) for inv in FLAVOURS[flavour]()}
    expected = EXPECTED_COMMANDS
    if flavour == "kubernetes":  # pods enroll with their ServiceAccount tokens, not join tokens
        expected = expected - {("ca", "token")} | {("ca", "attestor")}
        assert ("ca", "token") not in paths
    assert paths >= expected, f"missing: {expected - paths}"


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["ca", "serv", "--state", "/s", "--listen", "0.0.0.0:8443"], "no command 'serv'"),
        (["ca", "serve", "--state", "/s", "--listn", "0.0.0.0:8443"], "--listn"),
        (["ca", "serve", "--state", "/s"], "--listen"),
        (["ca", "token", "api"], "--state"),
        (["ca", "token", "--state", "/s", "api", "--ttl", "soon"], "--ttl"),
        (["ca", "bundle", "--state", "/s", "--format", "der"], "--format"),
        (["policy", "allow", "web", "--state", "/s"], "TO"),
        (["sidecar", "run", "--config", "/c.toml", "extra"], "extra"),
        (["ca"], "subcommand is missing"),
        (["kubectl", "get", "pods"], "no command 'kubectl'"),
    ],
)
def test_resolver_rejects_what_meshid_would(argv: list[str], complaint: str) -> None:
    with pytest.raises(CommandLineError, match=re.escape(complaint)):
        resolve(argv)


def test_resolver_reads_values_the_way_meshid_does() -> None:
    result = resolve(
        ["ca", "token", "--state", "/s", "api", "--ttl", "1h", "--dns", "a", "--dns", "b"]
    )
    assert result.path == ("ca", "token")
    assert result.params["spiffe_id"] == "api"
    assert result.params["dns"] == ("a", "b")
    assert result.params["ttl"].total_seconds() == 3600


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("meshid ca bundle --state /s > b.pem", [("ca", "bundle", "--state", "/s")]),
        (
            "kubectl --namespace meshid exec deploy/ca -c ca -- meshid policy list --state /s",
            [("policy", "list", "--state", "/s")],
        ),
        (
            "docker compose exec ca meshid policy list --state /s",
            [("policy", "list", "--state", "/s")],
        ),
        (
            "sudo -u meshid /opt/meshid/bin/meshid ca bundle --state /s",
            [("ca", "bundle", "--state", "/s")],
        ),
        ("test -e x || meshid ca init \\\n  --state /s", [("ca", "init", "--state", "/s")]),
        ("kubectl -n meshid get pods", []),
        ("useradd --system meshid", []),
        ("chown -R meshid:meshid /var/lib/meshid-ca", []),
        ("# meshid ca init --state /s", []),
    ],
)
def test_shell_extraction(script: str, expected: list[tuple[str, ...]]) -> None:
    assert meshid_in_script(script) == expected


# == Kubernetes ==============================================================


def test_k8s_objects_are_complete_and_namespaced() -> None:
    namespaces = {o["metadata"]["name"] for o in k8s_objects() if o["kind"] == "Namespace"}
    assert namespaces == {"meshid"}
    for obj in k8s_objects():
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") in namespaces, obj["metadata"]


def readme_created_objects() -> dict[tuple[str, str], set[str]]:
    """(kind, name) -> keys, for every `kubectl create secret|configmap` in the README."""
    created: dict[tuple[str, str], set[str]] = {}
    for block in code_blocks(K8S / "README.md"):
        for tokens in shell_lines(block):
            if "kubectl" not in tokens or "create" not in tokens:
                continue
            rest = tokens[tokens.index("create") + 1 :]
            if rest[0] == "secret":
                kind, name = "Secret", rest[2]
            elif rest[0] == "configmap":
                kind, name = "ConfigMap", rest[1]
            else:
                continue
            keys = created.setdefault((kind, name), set())
            for token in rest:
                flag, _, spec = token.partition("=")
                if flag == "--from-literal" or (flag == "--from-file" and "=" in spec):
                    keys.add(spec.partition("=")[0])
                elif flag == "--from-file":
                    keys.add(PurePosixPath(spec).name)
    return created


def object_keys(kind: str, name: str) -> set[str] | None:
    """The keys of a Secret or ConfigMap from the manifests or the README; None if neither."""
    obj = k8s_find(kind, name)
    if obj is not None:
        return set(obj.get("data", {})) | set(obj.get("stringData", {}))
    return readme_created_objects().get((kind, name))


def test_readme_creates_what_the_manifests_leave_out() -> None:
    created = readme_created_objects()
    assert ("Secret", "meshid-ca-passphrase") in created  # the extraction finds something
    for kind, name in created:
        assert k8s_find(kind, name) is None, f"{kind} {name} is both created and applied"


def test_k8s_references_resolve() -> None:
    for pod, spec in pod_specs():
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                kind, name, source = "ConfigMap", volume["configMap"]["name"], volume["configMap"]
            elif "secret" in volume:
                kind, name, source = "Secret", volume["secret"]["secretName"], volume["secret"]
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert k8s_find("PersistentVolumeClaim", claim), f"{pod}: no PVC {claim}"
                continue
            else:
                continue
            keys = object_keys(kind, name)
            assert keys is not None, f"{pod}: {kind} {name} is neither applied nor created"
            for item in source.get("items", []):
                assert item["key"] in keys, f"{pod}: {kind} {name} has no key {item['key']}"
        for container in all_containers(spec):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    keys = object_keys("Secret", ref["name"])
                    assert keys is not None, f"{pod}: no Secret {ref['name']}"
                    assert ref["key"] in keys, f"{pod}: Secret {ref['name']} has no {ref['key']}"
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            declared = {v["name"] for v in spec.get("volumes", [])}
            assert mounted <= declared, f"{pod}/{container['name']}: {mounted - declared}"


def test_k8s_references_negative_twin() -> None:
    assert object_keys("Secret", "no-such-secret") is None
    assert object_keys("ConfigMap", "meshid-bundle") == {"bundle.pem"}


def test_k8s_pods_are_hardened() -> None:
    assert pod_specs()
    for pod, spec in pod_specs():
        pod_ctx = spec.get("securityContext", {})
        assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", pod
        assert pod_ctx.get("runAsUser", 1) != 0, pod
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), pod
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, pod
        for container in all_containers(spec):
            ctx = container.get("securityContext", {})
            where = f"{pod}/{container['name']}"
            assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert not ctx.get("privileged"), where
            assert "ALL" in ctx.get("capabilities", {}).get("drop", []), where
            assert not ctx.get("capabilities", {}).get("add"), where


@dataclass
class Pod:
    name: str
    spec: dict[str, Any]
    volumes: dict[str, dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.volumes = {v["name"]: v for v in self.spec.get("volumes", [])}

    def container(self, name: str) -> dict[str, Any]:
        [found] = [c for c in all_containers(self.spec) if c["name"] == name]
        return found

    def mount_for(
        self, container: dict[str, Any], path: PurePosixPath
    ) -> tuple[dict[str, Any], PurePosixPath]:
        """The volume mount holding `path` (the deepest), and the path inside it."""
        best = None
        for mount in container.get("volumeMounts", []):
            base = PurePosixPath(mount["mountPath"])
            if (path == base or base in path.parents) and (
                best is None or len(base.parts) > len(PurePosixPath(best["mountPath"]).parts)
            ):
                best = mount
        assert best is not None, f"{self.name}/{container['name']}: nothing mounted at {path}"
        return best, path.relative_to(best["mountPath"])

    def port(self, container: dict[str, Any], port: int | str) -> int:
        if isinstance(port, int):
            return port
        for c in all_containers(self.spec):
            for p in c.get("ports", []):
                if p.get("name") == port:
                    assert c is container, f"{self.name}: port {port} is another container's"
                    return int(p["containerPort"])
        raise AssertionError(f"{self.name}: no port named {port}")

    def file_key(self, container: dict[str, Any], path: PurePosixPath, kind: str) -> str:
        """Check `path` is a key of a ConfigMap/Secret volume; return the object's name."""
        mount, inside = self.mount_for(container, path)
        volume = self.volumes[mount["name"]]
        source = volume.get("configMap") if kind == "ConfigMap" else volume.get("secret")
        assert source is not None, f"{self.name}: {path} is not on a {kind} volume"
        name = source["name"] if kind == "ConfigMap" else source["secretName"]
        keys = object_keys(kind, name)
        assert keys is not None, f"{self.name}: no {kind} {name}"
        items = {i["path"]: i["key"] for i in source.get("items", [])}
        key = items.get(str(inside), str(inside)) if items else str(inside)
        assert key in keys, f"{self.name}: {path} is not a key of {kind} {name} ({sorted(keys)})"
        assert mount.get("readOnly") is True, f"{self.name}: mount {mount['mountPath']} is writable"
        return str(name)


def k8s_pods() -> list[Pod]:
    return [Pod(name, spec) for name, spec in pod_specs()]


def meshid_container(pod: Pod, path: tuple[str, ...]) -> tuple[dict[str, Any], Resolved] | None:
    for container in all_containers(pod.spec):
        for argv in meshid_in_argv(container_argv(container)):
            result = resolve(argv)
            if result.path == path:
                return container, result
    return None


def service_for(pod: Pod) -> dict[str, Any]:
    labels = None
    for obj in k8s_objects():
        if obj["kind"] == "Deployment" and obj["metadata"]["name"] == pod.name:
            labels = obj["spec"]["template"]["metadata"]["labels"]
    for obj in k8s_objects():
        selector = obj["spec"].get("selector", {}) if obj["kind"] == "Service" else None
        if selector and labels and selector.items() <= labels.items():
            return obj
    raise AssertionError(f"no Service selects {pod.name}")


def test_k8s_authority() -> None:
    [ca_pod] = [p for p in k8s_pods() if meshid_container(p, ("ca", "serve"))]
    deployment = k8s_find("Deployment", ca_pod.name)
    assert deployment is not None
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    found = meshid_container(ca_pod, ("ca", "serve"))
    assert found is not None
    container, serve = found
    state = PurePosixPath(str(serve.params["state"]))
    mount, inside = ca_pod.mount_for(container, state)
    assert str(inside) == "." and not mount.get("readOnly")
    assert "persistentVolumeClaim" in ca_pod.volumes[mount["name"]]

    # The init container creates the authority in the same volume, guarded by
    # the file `ca init` commits last (a fresh volume may hold lost+found).
    init, attestor = ca_pod.spec["initContainers"]
    check_k8s_attestor(ca_pod, attestor, container, state)
    script = container_argv(init)[2]
    [init_argv] = meshid_in_argv(container_argv(init))
    ca_init = resolve(init_argv)
    assert ca_init.path == ("ca", "init")
    assert PurePosixPath(str(ca_init.params["state"])) == state
    init_mount, _ = ca_pod.mount_for(init, state)
    assert init_mount["name"] == mount["name"]
    assert re.search(rf"\[ !? ?-e {re.escape(str(state / DB_NAME))} \]", script), script

    # Probes and the Service reach the TLS listener; clients may name it by --dns.
    port = int(str(serve.params["listen"]).rpartition(":")[2])
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert (get["path"], get["scheme"]) == ("/healthz", "HTTPS")
        assert ca_pod.port(container, get["port"]) == port
    service = service_for(ca_pod)
    [svc_port] = service["spec"]["ports"]
    assert ca_pod.port(container, svc_port["targetPort"]) == port
    dns = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert dns in option_values(serve.params, "dns")


K8S_TEMPLATE = "ns/{kubernetes.io.namespace}/sa/{kubernetes.io.serviceaccount.name}"


def check_k8s_attestor(
    ca_pod: Pod, init: dict[str, Any], serve: dict[str, Any], state: PurePosixPath
) -> None:
    """The second init container adds the attestor once; `ca serve` reads its JWKS too."""
    calls = [resolve(argv) for argv in meshid_in_argv(container_argv(init))]
    assert [c.path for c in calls] == [("ca", "attestor", "list"), ("ca", "attestor", "add")]
    add = calls[1]
    assert all(PurePosixPath(str(c.params["state"])) == state for c in calls)
    assert add.params["name"] in container_argv(init)[2].split("grep -q '^")[1]
    assert (add.params["audience"], add.params["template"]) == ("meshid", K8S_TEMPLATE)
    assert option_values(add.params, "claims") == ["kubernetes.io.namespace=meshid"]
    jwks = PurePosixPath(str(add.params["jwks_file"]))
    assert ca_pod.file_key(init, jwks, "ConfigMap") == ca_pod.file_key(serve, jwks, "ConfigMap")


def k8s_sidecars() -> list[tuple[Pod, dict[str, Any], SidecarConfig]]:
    found = []
    for pod in k8s_pods():
        hit = meshid_container(pod, ("sidecar", "run"))
        if hit is None:
            continue
        container, run = hit
        config_path = PurePosixPath(str(run.params["config_path"]))
        name = pod.file_key(container, config_path, "ConfigMap")
        configmap = k8s_find("ConfigMap", name)
        assert configmap is not None, f"{pod.name}: the config must be in the manifests"
        found.append((pod, container, toml_config(configmap["data"][config_path.name])))
    return found


def test_k8s_sidecars_match_their_pods() -> None:
    sidecars = k8s_sidecars()
    assert {str(c.identity.path) for _, _, c in sidecars} == {
        "/ns/meshid/sa/api",
        "/ns/meshid/sa/web",
    }
    for pod, container, config in sidecars:
        check_native_sidecar_with_token(pod, container, config)
        assert config.admin is not None
        assert config.admin.host not in LOOPBACK, f"{pod.name}: the kubelet cannot probe loopback"
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, f"{pod.name}: {probe}"
            assert get.get("scheme", "HTTP") == "HTTP"
            assert pod.port(container, get["port"]) == config.admin.port, f"{pod.name}: {probe}"

        source = dynamic(config)
        pod.file_key(container, PurePosixPath(str(source.bundle)), "ConfigMap")
        state = PurePosixPath(str(source.state_dir))
        mount, inside = pod.mount_for(container, state)
        # The sidecar chmods its state dir: it must be a subdirectory it creates.
        assert str(inside) != ".", f"{pod.name}: state_dir is the mount point itself"
        assert not mount.get("readOnly")
        volume = pod.volumes[mount["name"]]
        assert "emptyDir" in volume or "persistentVolumeClaim" in volume

        # The app behind it listens where the sidecar forwards.
        [inbound] = config.inbound
        assert inbound.forward.host in LOOPBACK
        others = [c for c in pod.spec["containers"] if c is not container]
        assert any(str(inbound.forward.port) in container_argv(c) for c in others), pod.name
        service = service_for(pod)
        [svc_port] = service["spec"]["ports"]
        assert pod.port(container, svc_port["targetPort"]) == inbound.listen.port

        grace = pod.spec.get("terminationGracePeriodSeconds", 30)
        assert grace > config.limits.drain_timeout, f"{pod.name}: killed before it drains"


def check_native_sidecar_with_token(
    pod: Pod, container: dict[str, Any], config: SidecarConfig
) -> None:
    """A native sidecar that enrolls with its pod's projected ServiceAccount token."""
    assert container in pod.spec.get("initContainers", []), f"{pod.name}: not a native sidecar"
    assert container.get("restartPolicy") == "Always", pod.name
    startup = container["startupProbe"]["httpGet"]
    assert startup["path"] == "/readyz" and pod.port(container, startup["port"]) == 15090
    deployment = k8s_find("Deployment", pod.name)
    assert deployment is not None
    assert deployment["spec"]["replicas"] >= 2, f"{pod.name}: one replica"
    assert deployment["spec"].get("strategy", {}).get("type") != "Recreate", pod.name
    source = dynamic(config)
    assert source.token_file is None and source.jwt_file is not None, pod.name
    mount, inside = pod.mount_for(container, PurePosixPath(str(source.jwt_file)))
    assert mount.get("readOnly") is True
    [projected] = pod.volumes[mount["name"]]["projected"]["sources"]
    token = projected["serviceAccountToken"]
    assert (token["audience"], token["path"]) == ("meshid", str(inside)), pod.name
    assert token.get("expirationSeconds", 3600) <= 3600
    account = pod.spec["serviceAccountName"]
    assert k8s_find("ServiceAccount", account) is not None, f"{pod.name}: no SA {account}"
    assert pod.spec.get("automountServiceAccountToken") is False  # the API token is not needed
    assert config.identity.path == f"/ns/meshid/sa/{account}", pod.name  # the attestor's template
    assert not any("secret" in v for v in pod.volumes.values()), f"{pod.name}: a Secret per pod"


def test_k8s_sidecar_checks_negative_twin() -> None:
    [(pod, container, config)] = [s for s in k8s_sidecars() if s[0].name == "api"]
    spec = {**pod.spec, "initContainers": [], "containers": [*pod.spec["containers"], container]}
    with pytest.raises(AssertionError, match="native sidecar"):
        check_native_sidecar_with_token(Pod(pod.name, spec), container, config)
    other = {**pod.spec, "serviceAccountName": "web"}
    with pytest.raises(AssertionError):
        check_native_sidecar_with_token(Pod(pod.name, other), container, config)


def test_k8s_sidecars_reach_the_authority_and_their_upstreams() -> None:
    results = resolved("kubernetes")
    serve = the(results, "ca", "serve")
    ca_init = the(results, "ca", "init")
    [ca_pod] = [p for p in k8s_pods() if meshid_container(p, ("ca", "serve"))]
    ca_service = service_for(ca_pod)
    by_service = {service_for(pod)["metadata"]["name"]: config for pod, _, config in k8s_sidecars()}
    for pod, _, config in k8s_sidecars():
        assert str(config.trust_domain.name) == ca_init.params["trust_domain"], pod.name
        server = dynamic(config).server
        assert server.host in option_values(serve.params, "dns"), pod.name
        assert server.host.split(".")[0] == ca_service["metadata"]["name"]
        assert server.port == ca_service["spec"]["ports"][0]["port"]
        for outbound in config.outbound:
            name, ns = outbound.upstream.host.split(".")[:2]
            assert ns == "meshid", outbound.upstream
            upstream = by_service[name]
            assert upstream.identity == outbound.identity, f"{pod.name}: {name} is someone else"
            service = k8s_find("Service", name)
            assert service is not None
            assert outbound.upstream.port == service["spec"]["ports"][0]["port"]


def test_k8s_readme_allows_and_enrolls_what_the_manifests_need() -> None:
    results = resolved("kubernetes")
    configs = [config for _, _, config in k8s_sidecars()]
    pairs = allowed_pairs(results)
    for config in configs:
        for outbound in config.outbound:
            assert (config.identity.path[1:], outbound.identity.path[1:]) in pairs
    assert token_ids(results) == set()  # enrolled by ServiceAccount token, no join token
    readme = (K8S / "README.md").read_text()
    for manifest in sorted(K8S.glob("*.yaml")):
        assert f"kubectl apply -f deploy/kubernetes/{manifest.name}" in readme, manifest.name


# -- network policies ----------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where a connection comes from: a pod's namespace and labels."""

    namespace: str
    labels: dict[str, str]

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector; `{}` selects everything."""
    if not all(labels.get(k) == str(v) for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], set(expr.get("values", []))
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def pod_labels(pod: Pod) -> dict[str, str]:
    for obj in k8s_objects():
        if obj["kind"] == "Deployment" and obj["metadata"]["name"] == pod.name:
            return {k: str(v) for k, v in obj["spec"]["template"]["metadata"]["labels"].items()}
    raise AssertionError(f"no Deployment {pod.name}")


def pod_source(pod: Pod) -> Source:
    return Source("meshid", pod_labels(pod))


def named_port(pod: Pod, name: str) -> int | None:
    for container in all_containers(pod.spec):
        for port in container.get("ports", []):
            if port.get("name") == name and port.get("protocol", "TCP") == "TCP":
                return int(port["containerPort"])
    return None


def port_matches(rule_ports: list[dict[str, Any]], pod: Pod, port: int) -> bool:
    if not rule_ports:
        return True
    for spec in rule_ports:
        if spec.get("protocol", "TCP") != "TCP":
            continue
        want = spec.get("port")
        if want is None:
            return True
        if isinstance(want, str):
            if named_port(pod, want) == port:
                return True
        elif want <= port <= spec.get("endPort", want):
            return True
    return False


def peer_matches(peer: dict[str, Any], source: Source, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return False  # addresses outside the cluster's pods, not modelled here
    namespaces = peer.get("namespaceSelector")
    if namespaces is None:
        in_namespace = source.namespace == policy_namespace
    else:
        in_namespace = selects(namespaces, source.namespace_labels)
    pods = peer.get("podSelector")
    return in_namespace and (pods is None or selects(pods, source.labels))


def ingress_allowed(
    policies: list[dict[str, Any]], source: Source, pod: Pod, port: int, namespace: str = "meshid"
) -> bool:
    """NetworkPolicy ingress semantics for a TCP connection from `source` to `pod`:`port`."""
    labels = pod_labels(pod)
    isolating = [
        p
        for p in policies
        if p["metadata"]["namespace"] == namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], labels)
    ]
    if not isolating:
        return True
    for policy in isolating:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from", [])
            if (not peers or any(peer_matches(p, source, namespace) for p in peers)) and (
                port_matches(rule.get("ports", []), pod, port)
            ):
                return True
    return False


def network_policies() -> list[dict[str, Any]]:
    return [obj for obj in k8s_objects() if obj["kind"] == "NetworkPolicy"]


MONITORING = Source("monitoring", {"app.kubernetes.io/name": "prometheus"})
STRANGER = Source("meshid", {"app.kubernetes.io/name": "debug-shell"})
ELSEWHERE = Source("default", {"app.kubernetes.io/name": "anything"})


def test_network_policies_isolate_every_pod() -> None:
    policies = network_policies()
    assert policies
    for pod in k8s_pods():
        for container in all_containers(pod.spec):
            for port in container.get("ports", []):
                number = int(port["containerPort"])
                assert not ingress_allowed(policies, STRANGER, pod, number), (pod.name, number)
                assert not ingress_allowed(policies, ELSEWHERE, pod, number), (pod.name, number)


def test_network_policies_let_only_workloads_reach_the_authority() -> None:
    policies = network_policies()
    [ca_pod] = [p for p in k8s_pods() if meshid_container(p, ("ca", "serve"))]
    found = meshid_container(ca_pod, ("ca", "serve"))
    assert found is not None
    port = int(str(found[1].params["listen"]).rpartition(":")[2])
    workloads = [pod for pod, _, _ in k8s_sidecars()]
    assert workloads
    for pod in workloads:
        assert ingress_allowed(policies, pod_source(pod), ca_pod, port), pod.name
        assert not ingress_allowed(policies, pod_source(pod), ca_pod, port + 1), pod.name
        # A pod elsewhere that copies the workloads' labels gets nowhere.
        impostor = Source("default", pod_labels(pod))
        assert not ingress_allowed(policies, impostor, ca_pod, port), pod.name
    for source in (pod_source(ca_pod), MONITORING, STRANGER, ELSEWHERE):
        assert not ingress_allowed(policies, source, ca_pod, port), source


def test_network_policies_guard_the_sidecars_ports() -> None:
    policies = network_policies()
    [ca_pod] = [p for p in k8s_pods() if meshid_container(p, ("ca", "serve"))]
    sidecars = k8s_sidecars()
    by_service = {service_for(pod)["metadata"]["name"]: (pod, c) for pod, _, c in sidecars}
    for pod, _, config in sidecars:
        assert config.admin is not None
        [inbound] = config.inbound
        mesh, admin, app = inbound.listen.port, config.admin.port, inbound.forward.port
        others = [p for p, _, _ in sidecars if p is not pod]
        assert others, "two workloads call each other"
        for caller in others:
            assert ingress_allowed(policies, pod_source(caller), pod, mesh), (caller.name, pod.name)
            assert not ingress_allowed(policies, pod_source(caller), pod, admin), pod.name
        for source in (pod_source(ca_pod), STRANGER, ELSEWHERE, MONITORING):
            assert not ingress_allowed(policies, source, pod, mesh), (source, pod.name)
        # Metrics for the monitoring namespace only; the app for nobody.
        assert ingress_allowed(policies, MONITORING, pod, admin), pod.name
        for source in (pod_source(ca_pod), STRANGER, ELSEWHERE):
            assert not ingress_allowed(policies, source, pod, admin), (source, pod.name)
        for source in (*(pod_source(p) for p, _, _ in sidecars), MONITORING, STRANGER):
            assert not ingress_allowed(policies, source, pod, app), (source, pod.name)
        # Every outbound upstream is a mesh port the caller may reach.
        for outbound in config.outbound:
            upstream, upstream_config = by_service[outbound.upstream.host.split(".")[0]]
            port = upstream_config.inbound[0].listen.port
            assert ingress_allowed(policies, pod_source(pod), upstream, port), pod.name


def test_network_policy_checks_negative_twin() -> None:
    [pod] = [p for p in k8s_pods() if p.name == "api"]
    assert ingress_allowed([], STRANGER, pod, 15090)  # no policy: open
    deny_all = {
        "metadata": {"namespace": "meshid"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    assert not ingress_allowed([deny_all], pod_source(pod), pod, 15001)
    assert ingress_allowed([deny_all], STRANGER, pod, 15001, namespace="other")
    by_name = {
        "metadata": {"namespace": "meshid"},
        "spec": {
            "podSelector": {
                "matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "Exists"}]
            },
            "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": "admin"}]}],
        },
    }
    assert ingress_allowed([by_name], STRANGER, pod, 15090)
    assert not ingress_allowed([by_name], STRANGER, pod, 15001)
    assert not ingress_allowed([by_name], ELSEWHERE, pod, 15090)
    everywhere = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"x": "1"}}}
    assert peer_matches(everywhere, Source("default", {"x": "1"}), "meshid")
    assert not peer_matches(everywhere, Source("default", {"x": "2"}), "meshid")
    assert not selects(
        {"matchExpressions": [{"key": "x", "operator": "In", "values": ["2"]}]}, {"x": "1"}
    )


# == Docker Compose ===========================================================


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert image_entrypoint() == ["meshid"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "meshid" in pyproject["project"]["scripts"]
    [user] = [rest for word, rest in instructions if word == "USER"]
    uid = user.partition(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid (runAsNonRoot checks it)"
    assert any(word == "RUN" and "pip install ." in rest for word, rest in instructions)
    # Everything `COPY`ed is what the package needs.
    packages = {p.split(" ")[0] for w, p in instructions if w == "COPY" and "./" in p}
    assert {"meshid", "ca", "sidecar"} <= packages


def dockerfile_owned_dirs() -> set[str]:
    owned = set()
    for word, rest in dockerfile_instructions():
        if word == "RUN":
            for part in rest.split("&&"):
                tokens = shlex.split(part)
                if tokens[:2] == ["install", "-d"] and "-o" in tokens:
                    owned |= {t for t in tokens if t.startswith("/")}
    return owned


def compose_services() -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    assert isinstance(services, dict)
    return services


def compose_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of a service's volumes (short syntax)."""
    out = []
    for spec in service.get("volumes", []):
        parts = spec.split(":")
        out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def compose_mount_for(
    service: dict[str, Any], path: PurePosixPath
) -> tuple[str, PurePosixPath, bool]:
    best = None
    for source, target, ro in compose_mounts(service):
        base = PurePosixPath(target)
        if (path == base or base in path.parents) and (
            best is None or len(base.parts) > len(PurePosixPath(best[1]).parts)
        ):
            best = (source, target, ro)
    assert best is not None, f"nothing mounted at {path}"
    return best[0], path.relative_to(best[1]), best[2]


def test_compose_services_are_hardened() -> None:
    for name, service in compose_services().items():
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert not service.get("privileged"), name
        if service["image"] != MESHID_IMAGE:
            assert str(service.get("user", "0")).partition(":")[0] not in ("0", "root"), name


def test_compose_writable_volumes_are_owned_by_meshid() -> None:
    # Docker copies the image's directory, owner included, into a new named
    # volume; a target the image lacks would be root's and unwritable.
    owned = dockerfile_owned_dirs()
    assert owned
    named = set(compose().get("volumes", {}))
    for name, service in compose_services().items():
        if service["image"] != MESHID_IMAGE:
            continue
        for source, target, ro in compose_mounts(service):
            if source in named and not ro:
                assert target in owned, f"{name}: {target} is not created for meshid in the image"


def compose_sidecars() -> list[tuple[str, dict[str, Any], SidecarConfig]]:
    found = []
    for name, service in compose_services().items():
        for argv in meshid_in_argv(service_argv(service)):
            run = resolve(argv)
            if run.path == ("sidecar", "run"):
                source, inside, ro = compose_mount_for(
                    service, PurePosixPath(str(run.params["config_path"]))
                )
                assert ro and str(inside) == "." and source.startswith("./"), name
                found.append((name, service, toml_config((COMPOSE / source).read_text())))
    return found


def written_by_join(volume: str, inside: PurePosixPath) -> bool:
    """Does a one-shot service write `inside` of `volume` with a shell redirect?"""
    for service in compose_services().values():
        argv = service_argv(service)
        if argv[:1] and argv[0] in SHELLS:
            for source, target, ro in compose_mounts(service):
                written = rf">\s*{re.escape(str(PurePosixPath(target) / inside))}\s*$"
                if source == volume and not ro and re.search(written, argv[2], re.M):
                    return True
    return False


def test_compose_sidecars_match_their_services() -> None:
    services = compose_services()
    results = resolved("compose")
    serve = the(results, "ca", "serve")
    ca_init = the(results, "ca", "init")
    [ca_name] = [
        n
        for n, s in services.items()
        for a in meshid_in_argv(service_argv(s))
        if a[:2] == ("ca", "serve")
    ]
    sidecars = compose_sidecars()
    assert {str(c.identity.path) for _, _, c in sidecars} == {"/api", "/web"}
    by_app = {}
    named = set(compose().get("volumes", {}))
    for name, service, config in sidecars:
        app = service["network_mode"].removeprefix("service:")
        by_app[app] = config
        assert config.trust_domain.name == ca_init.params["trust_domain"], name
        assert config.admin is not None
        test_cmd = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{config.admin.port}/readyz" in test_cmd, name
        assert seconds(service["stop_grace_period"]) > config.limits.drain_timeout, name
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM"

        source = dynamic(config)
        server = source.server
        assert (server.host, server.port) == (
            ca_name,
            int(str(serve.params["listen"]).rpartition(":")[2]),
        )
        assert server.host in option_values(serve.params, "dns")
        for path in (source.bundle, source.token_file):
            volume, inside, ro = compose_mount_for(service, PurePosixPath(str(path)))
            assert volume in named and ro, f"{name}: {path}"
            assert written_by_join(volume, inside), f"{name}: nothing writes {path}"
        volume, inside, ro = compose_mount_for(service, PurePosixPath(str(source.state_dir)))
        assert volume in named and not ro and str(inside) != ".", f"{name}: state_dir"

        [inbound] = config.inbound
        assert inbound.forward.host in LOOPBACK
        assert str(inbound.forward.port) in service_argv(services[app]), f"{name}: {app} port"
    for name, _, config in sidecars:
        for outbound in config.outbound:
            upstream = by_app[outbound.upstream.host]
            assert upstream.identity == outbound.identity, name
            assert upstream.inbound[0].listen.port == outbound.upstream.port, name


def test_compose_allows_and_enrolls_what_the_sidecars_need() -> None:
    results = resolved("compose")
    configs = [config for _, _, config in compose_sidecars()]
    pairs = allowed_pairs(results)
    for config in configs:
        for outbound in config.outbound:
            assert (config.identity.path[1:], outbound.identity.path[1:]) in pairs
    assert token_ids(results) == {c.identity.path[1:] for c in configs}
    [init_service] = [
        s
        for s in compose_services().values()
        for a in meshid_in_argv(service_argv(s))
        if a[:2] == ("ca", "init")
    ]
    state = the(results, "ca", "init").params["state"]
    assert re.search(
        rf"\[ !? ?-e {re.escape(str(PurePosixPath(str(state)) / DB_NAME))} \]",
        service_argv(init_service)[2],
    )


def test_compose_checks_negative_twin() -> None:
    assert not written_by_join("web-join", PurePosixPath("no-such-file"))
    assert not written_by_join("no-such-volume", PurePosixPath("token"))
    with pytest.raises(AssertionError, match="nothing mounted"):
        compose_mount_for(compose_services()["ca"], PurePosixPath("/nowhere/x"))


# == the root key's passphrase =================================================


def _commands(
    command: click.Command, ctx: click.Context, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None
            yield from _commands(sub, click.Context(sub, info_name=name, parent=ctx), (*path, name))
    else:
        yield path, command


@functools.cache
def passphrase_commands() -> frozenset[tuple[str, ...]]:
    """Every meshid command that reads the root key's passphrase (it has --passphrase-file)."""
    root = click.Context(cli, info_name="meshid")
    return frozenset(
        path
        for path, command in _commands(cli, root, ())
        if any(param.name == "passphrase_file" for param in command.params)
    )


def passphrase_in_env(names_and_refs: list[tuple[str, str | None]]) -> list[str]:
    """Environment entries (name, referenced Secret) that carry a passphrase."""
    return [
        name
        for name, ref in names_and_refs
        if "passphrase" in name.lower() or (ref is not None and "passphrase" in ref.lower())
    ]


def k8s_env(container: dict[str, Any]) -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []
    for env in container.get("env", []):
        source = env.get("valueFrom", {})
        ref = source.get("secretKeyRef") or source.get("configMapKeyRef") or {}
        found.append((str(env["name"]), ref.get("name")))
    for env_from in container.get("envFrom", []):
        ref = env_from.get("secretRef") or env_from.get("configMapRef") or {}
        found.append((str(env_from.get("prefix", "")), ref.get("name")))
    return found


def compose_env(service: dict[str, Any]) -> list[tuple[str, str | None]]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        names = [str(item).partition("=")[0] for item in environment]
    else:
        names = [str(name) for name in environment]
    env_files = service.get("env_file", [])
    env_files = [env_files] if isinstance(env_files, str | dict) else env_files
    refs = [str(f.get("path") if isinstance(f, dict) else f) for f in env_files]
    return [(name, None) for name in names] + [("", ref) for ref in refs]


def test_k8s_passphrase_never_in_the_environment() -> None:
    for pod, spec in pod_specs():
        for container in all_containers(spec):
            found = passphrase_in_env(k8s_env(container))
            assert not found, f"{pod}/{container['name']}: passphrase in env {found}"


def test_compose_passphrase_never_in_the_environment() -> None:
    for name, service in compose_services().items():
        found = passphrase_in_env(compose_env(service))
        assert not found, f"{name}: passphrase in environment {found}"


def test_passphrase_env_checks_negative_twin() -> None:
    assert passphrase_commands() >= {("ca", "init"), ("ca", "serve"), ("ca", "rotate")}
    as_env = {
        "name": "MESHID_CA_PASSPHRASE",
        "valueFrom": {"secretKeyRef": {"name": "meshid-ca-passphrase", "key": "passphrase"}},
    }
    assert passphrase_in_env(k8s_env({"env": [as_env]})) == ["MESHID_CA_PASSPHRASE"]
    by_ref = {"envFrom": [{"secretRef": {"name": "meshid-ca-passphrase"}}]}
    assert passphrase_in_env(k8s_env(by_ref)) == [""]
    listed = {"environment": ["MESHID_CA_PASSPHRASE=x"]}
    assert passphrase_in_env(compose_env(listed)) == ["MESHID_CA_PASSPHRASE"]
    assert passphrase_in_env(compose_env({"env_file": "ca-passphrase.env"})) == [""]
    assert passphrase_in_env(compose_env({"environment": {"TZ": "UTC"}})) == []


def k8s_passphrase_files() -> list[tuple[Pod, dict[str, Any], Resolved]]:
    """(pod, container, command) for each container running a passphrase command."""
    found = []
    for pod in k8s_pods():
        for container in all_containers(pod.spec):
            for argv in meshid_in_argv(container_argv(container)):
                run = resolve(argv)
                if run.path in passphrase_commands():
                    found.append((pod, container, run))
    return found


def test_k8s_passphrase_comes_from_a_read_only_secret_file() -> None:
    runs = k8s_passphrase_files()
    assert {run.path for _, _, run in runs} >= {("ca", "init"), ("ca", "serve")}
    files = set()
    for pod, container, run in runs:
        where = f"{pod.name}/{container['name']}: meshid {' '.join(run.path)}"
        assert run.params["passphrase_file"] is not None, f"{where} without --passphrase-file"
        path = PurePosixPath(str(run.params["passphrase_file"]))
        files.add(path)
        secret = pod.file_key(container, path, "Secret")  # a key, mounted read-only
        mount, _ = pod.mount_for(container, path)
        source = pod.volumes[mount["name"]]["secret"]
        items = source.get("items") or [{}]
        modes = {item.get("mode", source.get("defaultMode")) for item in items}
        assert modes == {0o400}, f"{where}: {secret} is mounted with modes {modes}, not 0400"
        # Mounted only where a command reads it.
        for other in all_containers(pod.spec):
            if any(m["name"] == mount["name"] for m in other.get("volumeMounts", [])):
                assert any(
                    resolve(a).path in passphrase_commands()
                    for a in meshid_in_argv(container_argv(other))
                ), f"{pod.name}/{other['name']} mounts {secret} and reads no passphrase"
    # Commands run by hand in the authority's container read the same file.
    for inv in k8s_invocations():
        run = resolve(inv.argv)
        if inv.source.endswith("README.md") and run.path in passphrase_commands():
            given = run.params["passphrase_file"]
            assert given is not None and PurePosixPath(str(given)) in files, str(inv)


def compose_secret_targets(service: dict[str, Any]) -> dict[PurePosixPath, str]:
    """Where each of a service's secrets appears in its containers."""
    targets = {}
    for item in service.get("secrets", []):
        source = item if isinstance(item, str) else item["source"]
        target = source if isinstance(item, str) else item.get("target", source)
        targets[PurePosixPath("/run/secrets") / target] = source  # an absolute target wins
    return targets


def test_compose_passphrase_comes_from_a_secret_file() -> None:
    secrets = compose().get("secrets", {})
    runs = []
    for name, service in compose_services().items():
        for argv in meshid_in_argv(service_argv(service)):
            run = resolve(argv)
            if run.path in passphrase_commands():
                runs.append((name, service, run))
    assert {run.path for _, _, run in runs} >= {("ca", "init"), ("ca", "serve")}
    files = set()
    for name, service, run in runs:
        where = f"{name}: meshid {' '.join(run.path)}"
        assert run.params["passphrase_file"] is not None, f"{where} without --passphrase-file"
        path = PurePosixPath(str(run.params["passphrase_file"]))
        files.add(path)
        source = compose_secret_targets(service).get(path)
        assert source is not None, f"{where}: {path} is not one of the service's secrets"
        assert set(secrets[source]) == {"file"}, f"{where}: secret {source} is not a file"
    for name, service in compose_services().items():
        if name not in {n for n, _, _ in runs}:
            assert not service.get("secrets"), f"{name} mounts a secret it does not read"
    for inv in compose_invocations():
        run = resolve(inv.argv)
        if inv.source.endswith("README.md") and run.path in passphrase_commands():
            given = run.params["passphrase_file"]
            assert given is not None and PurePosixPath(str(given)) in files, str(inv)


def test_compose_secret_targets() -> None:
    service = {"secrets": ["a", {"source": "b", "target": "bee"}, {"source": "c", "target": "/c"}]}
    assert compose_secret_targets(service) == {
        PurePosixPath("/run/secrets/a"): "a",
        PurePosixPath("/run/secrets/bee"): "b",
        PurePosixPath("/c"): "c",
    }


# == memory ===================================================================

KiB = 1024
MiB = 1024 * KiB

# A sidecar's memory is a base (interpreter, TLS contexts, config, metrics)
# plus a share per live connection (two sockets' buffers, the TLS state, the
# copy tasks): about 44 MiB + 40 KiB each as measured. The bound keeps some
# headroom over that, so a container limit must hold max_connections at
# this cost or the kernel kills the sidecar before the sidecar refuses.
SIDECAR_BASE = 48 * MiB
SIDECAR_PER_CONNECTION = 48 * KiB

_K8S_UNITS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": KiB,
    "Mi": MiB,
    "Gi": 1024 * MiB,
    "Ti": 1024 * 1024 * MiB,
}
_DOCKER_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": 1024 * MiB}


def k8s_bytes(quantity: str | int) -> int:
    """A Kubernetes memory quantity (`256Mi`, `1G`, `268435456`) in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(quantity))
    assert match is not None, f"not a memory quantity: {quantity!r}"
    return int(float(match[1]) * _K8S_UNITS[match[2] or ""])


def docker_bytes(quantity: str | int) -> int:
    """A Compose memory size (`256m`, `1g`, `256mb`, bytes) in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([bkmg])?b?", str(quantity).lower())
    assert match is not None, f"not a memory size: {quantity!r}"
    return int(float(match[1]) * _DOCKER_UNITS[match[2] or ""])


def memory_needed(config: SidecarConfig) -> int:
    return SIDECAR_BASE + SIDECAR_PER_CONNECTION * config.limits.max_connections


def memory_problem(where: str, limit: int | None, config: SidecarConfig) -> str | None:
    """Why a sidecar with this memory limit would be OOM-killed under load, or None."""
    if limit is None:
        return f"{where}: no memory limit"
    need = memory_needed(config)
    if limit < need:
        return (
            f"{where}: memory limit {limit / MiB:.1f} MiB is below the "
            f"{need / MiB:.1f} MiB that max_connections = {config.limits.max_connections} needs"
        )
    return None


def compose_memory_limit(service: dict[str, Any]) -> int | None:
    limits = [service.get("mem_limit")]
    limits.append(service.get("deploy", {}).get("resources", {}).get("limits", {}).get("memory"))
    found = [docker_bytes(limit) for limit in limits if limit is not None]
    return min(found) if found else None


def test_k8s_sidecar_memory_limits_hold_max_connections() -> None:
    sidecars = k8s_sidecars()
    assert sidecars
    for pod, container, config in sidecars:
        limit = container.get("resources", {}).get("limits", {}).get("memory")
        problem = memory_problem(
            f"{pod.name}/{container['name']}", None if limit is None else k8s_bytes(limit), config
        )
        assert problem is None, problem


def test_compose_sidecar_memory_limits_hold_max_connections() -> None:
    sidecars = compose_sidecars()
    assert sidecars
    for name, service, config in sidecars:
        problem = memory_problem(name, compose_memory_limit(service), config)
        assert problem is None, problem


def test_memory_checks_negative_twin() -> None:
    # A config that leaves max_connections out gets the code's default.
    [text] = [t for n, t in sidecar_configs() if n == "ConfigMap api-sidecar/sidecar.toml"]
    unset = toml_config(re.sub(r"(?m)^\s*max_connections\s*=.*$", "", text))
    assert unset.limits.max_connections == Limits().max_connections
    need = memory_needed(unset)
    assert memory_problem("x", None, unset) == "x: no memory limit"
    assert memory_problem("x", need - 1, unset) is not None
    assert memory_problem("x", need, unset) is None
    assert k8s_bytes("256Mi") == 256 * MiB
    assert k8s_bytes("1G") == 10**9
    assert k8s_bytes(268435456) == 256 * MiB
    assert docker_bytes("256m") == docker_bytes("256MB") == 256 * MiB
    deploy_limit = {"deploy": {"resources": {"limits": {"memory": "1g"}}}}
    assert compose_memory_limit(deploy_limit) == 1024 * MiB
    assert compose_memory_limit({}) is None
    with pytest.raises(AssertionError, match="not a memory quantity"):
        k8s_bytes("lots")


# == systemd =================================================================


HARDENING = {
    "DynamicUser": "no",
    "User": "meshid",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "KillSignal": "SIGTERM",
    "Restart": "on-failure",
}


@pytest.mark.parametrize("unit", ["meshid-ca.service", "meshid-sidecar@.service"])
def test_unit_hardening(unit: str) -> None:
    path = SYSTEMD / unit
    for key, value in HARDENING.items():
        assert unit_value(path, key) == value, key
    assert "@system-service" in unit_values(path, "SystemCallFilter")
    # Writable: the state directory; anything else must be asked for explicitly.
    assert unit_value(path, "StateDirectory")
    for extra in unit_values(path, "ReadWritePaths"):
        assert extra, "an empty ReadWritePaths= is a leftover"


def test_ca_unit_matches_its_command() -> None:
    path = SYSTEMD / "meshid-ca.service"
    [serve] = [resolve(a) for a in meshid_in_script(unit_value(path, "ExecStart"))]
    assert serve.path == ("ca", "serve")
    assert str(serve.params["state"]) == "/var/lib/" + unit_value(path, "StateDirectory")
    passphrase = str(serve.params["passphrase_file"])
    assert passphrase.startswith("%d/"), "the passphrase comes through LoadCredential"
    credentials = {v.partition(":")[0] for v in unit_values(path, "LoadCredential")}
    assert passphrase.removeprefix("%d/") in credentials


def test_sidecar_unit_matches_the_example_config() -> None:
    path = SYSTEMD / "meshid-sidecar@.service"
    [run] = [resolve(a) for a in meshid_in_script(unit_value(path, "ExecStart"))]
    assert run.path == ("sidecar", "run")
    assert str(run.params["config_path"]) == "/etc/meshid/%i.toml"
    config = toml_config((SYSTEMD / "web.toml").read_text())  # for meshid-sidecar@web
    assert config.identity.path == "/web"
    state_dir = "/var/lib/" + unit_value(path, "StateDirectory").replace("%i", "web")
    assert str(dynamic(config).state_dir) == state_dir
    assert seconds(unit_value(path, "TimeoutStopSec")) > config.limits.drain_timeout

    results = resolved("systemd")
    assert config.trust_domain.name == the(results, "ca", "init").params["trust_domain"]
    serve = the(results, "ca", "serve")
    assert dynamic(config).server.host in option_values(serve.params, "dns")
    assert dynamic(config).server.port == int(str(serve.params["listen"]).rpartition(":")[2])
    pairs = allowed_pairs(results)
    for outbound in config.outbound:
        assert ("web", outbound.identity.path[1:]) in pairs
    assert "web" in token_ids(results)


def systemd_analyze_verify(units: list[Path], tmp_path: Path) -> tuple[int, list[str]]:
    """Verify copies of the units whose ExecStart runs this venv's meshid.

    The real path (/opt/meshid/bin/meshid) does not exist here, and verify
    insists that it does. The template is verified as instance `web`. Lines
    about the `meshid` user not existing on this machine are dropped (only
    those); everything else verify says is returned.
    """
    meshid = Path(sys.executable).parent / "meshid"
    assert meshid.exists(), meshid
    copies = []
    for unit in units:
        text = unit.read_text().replace("/opt/meshid/bin/meshid", str(meshid))
        name = unit.name.replace("@.service", "@web.service")
        (tmp_path / name).write_text(text)
        copies.append(str(tmp_path / name))
    result = subprocess.run(
        ["systemd-analyze", "verify", *copies],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    user_complaint = re.compile(r"(user|group)\b.*\bmeshid\b|\bmeshid\b.*\b(user|group)", re.I)
    lines = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and not user_complaint.search(line)
    ]
    return result.returncode, lines


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@needs_systemd_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    code, complaints = systemd_analyze_verify(unit_files(), tmp_path)
    assert complaints == []
    assert code == 0


@needs_systemd_analyze
def test_systemd_analyze_verify_negative_twin(tmp_path: Path) -> None:
    broken = tmp_path / "src" / "meshid-ca.service"
    broken.parent.mkdir()
    broken.write_text(
        (SYSTEMD / "meshid-ca.service")
        .read_text()
        .replace("KillSignal=SIGTERM", "KillSignal=SIGBOGUS")
    )
    _, complaints = systemd_analyze_verify([broken], tmp_path)
    assert any("SIGBOGUS" in line for line in complaints), complaints

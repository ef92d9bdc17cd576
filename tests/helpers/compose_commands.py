"""Turns compose.yaml's services into local processes' argv + env, for tests that run them here.

    services = local_services(variables={"TANDEM_MODEL": "dummy:tiny"}, otlp_endpoint=None,
                              path_map={"/cache": str(tmp_path)})
    # what `docker compose --profile single-gpu up worker frontend-single-gpu` starts
    services = local_services(profiles=("single-gpu",), only=("worker", "frontend-single-gpu"))
    for service in services:                       # dependencies first
        argv = [sys.executable, "-m", "services.cli", *service.argv[1:]]
        subprocess.Popen(argv, env={**os.environ, **service.env})

Which services: those without `profiles` and those of an active profile (`profiles`), as compose
picks them; with `only`, just those named and what they depend on, as `compose up NAME...` does.

What changes on the way (everything else is kept, so a test runs exactly what compose runs):
- `${VAR}`, `${VAR:-default}`, `${VAR-default}` are interpolated from `variables` (like compose does
  from the shell), `$$` becomes `$`;
- a compose service's name given as a flag value -> 127.0.0.1 (`--kv-host prefill`), `name:PORT` -> `127.0.0.1:<free port>`,
  `localhost:PORT` in a healthcheck -> this service's own free port, `0.0.0.0` -> 127.0.0.1;
- `--port`, `--kv-port`, `--metrics-port`, ... values -> a free port, the same one every other
  service uses to reach it;
- `--otlp-traces-endpoint` -> `otlp_endpoint`, or the flag is dropped when that is None (tracing
  off); any other reference to a skipped service (Jaeger) is an error;
- container paths (`/cache`, `/models`) -> local ones through `path_map`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any

import yaml

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE_PATH = REPO_ROOT / "compose.yaml"
LOOPBACK = "127.0.0.1"
OTLP_FLAG = "--otlp-traces-endpoint"

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")
_HOST_PORT = re.compile(r"(?P<host>[A-Za-z][A-Za-z0-9_.-]*):(?P<port>\d{2,5})\b")


@dataclasses.dataclass
class LocalService:
    name: str
    argv: list[str]  # starts with the program name, "tandem"
    env: dict[str, str]  # the service's own environment (add it to os.environ)
    ports: dict[int, int]  # container port -> local port
    healthcheck_argv: list[str] | None  # e.g. ["python", "-m", "common.healthcheck", "--address", ...]
    depends_on: list[str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def load_compose(path: str | pathlib.Path = COMPOSE_PATH) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        raise ValueError(f"{path}: no 'services' mapping")
    return data


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose-style variable substitution of one string."""

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.group("name"), match.group("op"), match.group("default")
        value = variables.get(name)
        if op == ":-" and not value:
            return default
        if op == "-" and value is None:
            return default
        return value or ""

    return _VARIABLE.sub(substitute, text)


def _interpolate_tree(node: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [_interpolate_tree(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, variables) for key, value in node.items()}
    return node


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


class _PortMap:
    """(service, container port) -> local free port, allocated once and shared by every reference."""

    def __init__(self, port_factory: Callable[[], int]):
        self._factory = port_factory
        self.by_key: dict[tuple[str, int], int] = {}

    def __call__(self, service: str, port: int) -> int:
        if (service, port) not in self.by_key:
            self.by_key[(service, port)] = self._factory()
        return self.by_key[(service, port)]


def _rewrite_token(token: str, owner: str, names: set[str], skipped: set[str], ports: _PortMap,
                   path_map: Mapping[str, str], is_value: bool = True) -> str:
    """`is_value`: the token is a flag's or variable's value (a bare service name there is a host)."""
    if is_value and token in names:
        return LOOPBACK
    if token == "0.0.0.0":
        return LOOPBACK
    for container_path, local_path in path_map.items():
        if token == container_path or token.startswith(container_path.rstrip("/") + "/"):
            token = local_path + token[len(container_path):]

    def host_port(match: re.Match) -> str:
        host, port = match.group("host"), int(match.group("port"))
        if host in skipped:
            raise ValueError(f"service {owner!r} refers to {host}:{port}, a service that is not run locally")
        if host == "localhost":
            return f"{LOOPBACK}:{ports(owner, port)}"
        if host in names:
            return f"{LOOPBACK}:{ports(host, port)}"
        return match.group(0)

    return _HOST_PORT.sub(host_port, token)


def _rewrite_command(command: list[str], owner: str, names: set[str], skipped: set[str], ports: _PortMap,
                     path_map: Mapping[str, str], otlp_endpoint: str | None) -> list[str]:
    rewritten: list[str] = []
    index = 0
    while index < len(command):
        token = command[index]
        value = command[index + 1] if index + 1 < len(command) else None
        if token == OTLP_FLAG and value is not None:
            if otlp_endpoint is not None:
                rewritten += [token, otlp_endpoint]
            index += 2
            continue
        if token.startswith("--") and token.endswith("port") and value is not None and value.isdigit():
            rewritten += [token, str(ports(owner, int(value)))]
            index += 2
            continue
        is_value = index > 0 and command[index - 1].startswith("--")
        rewritten.append(_rewrite_token(token, owner, names, skipped, ports, path_map, is_value))
        index += 1
    return rewritten


def _selected(services: dict[str, dict[str, Any]], profiles: tuple[str, ...], only: tuple[str, ...] | None) -> set[str]:
    """The services compose would start: unprofiled or of an active profile; with `only`, those named
    and (transitively) what they depend on."""
    active = {name for name, service in services.items()
              if not service.get("profiles") or set(service["profiles"]) & set(profiles)}
    if only is None:
        return active
    unknown = [name for name in only if name not in active]
    if unknown:
        raise ValueError(f"no active service named {unknown} (profiles {list(profiles)})")
    chosen: set[str] = set()
    pending = list(only)
    while pending:
        name = pending.pop()
        if name not in chosen:
            chosen.add(name)
            pending += list(services[name].get("depends_on") or [])
    return chosen


def _start_order(services: dict[str, dict[str, Any]]) -> list[str]:
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in stack:
            raise ValueError(f"depends_on cycle: {' -> '.join((*stack, name))}")
        for dependency in services[name]["depends_on"]:
            if dependency in services:
                visit(dependency, (*stack, name))
        order.append(name)

    for name in services:
        visit(name, ())
    return order


def local_services(
    compose_path: str | pathlib.Path = COMPOSE_PATH,
    variables: Mapping[str, str] | None = None,
    otlp_endpoint: str | None = None,
    path_map: Mapping[str, str] | None = None,
    skip: tuple[str, ...] = ("jaeger",),
    port_factory: Callable[[], int] = free_port,
    profiles: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
) -> list[LocalService]:
    """Every compose service of the active `profiles` (or `only` those and their dependencies) but `skip`,
    rewritten to run on this machine, dependencies first."""
    data = load_compose(compose_path)
    all_services = _interpolate_tree(data["services"], variables or {})
    selected = _selected(all_services, profiles, only)
    names, skipped = set(all_services), set(skip) | (set(all_services) - selected)
    path_map = dict(path_map or {})
    ports = _PortMap(port_factory)
    prepared: dict[str, dict[str, Any]] = {}
    for name, service in all_services.items():
        if name in skipped:
            continue
        command = service.get("command")
        if not isinstance(command, list):
            raise ValueError(f"service {name!r}: command must be a YAML list, got {command!r}")
        depends_on = service.get("depends_on") or []
        prepared[name] = {
            "command": command,
            "env": _environment(service),
            "test": (service.get("healthcheck") or {}).get("test"),
            "depends_on": [d for d in depends_on if d not in skipped],
        }
    result = []
    for name in _start_order(prepared):
        service = prepared[name]
        argv = ["tandem", *_rewrite_command(
            [str(t) for t in service["command"]], name, names, skipped, ports, path_map, otlp_endpoint)]
        env = {k: _rewrite_token(v, name, names, skipped, ports, path_map) for k, v in service["env"].items()}
        result.append(LocalService(
            name=name,
            argv=argv,
            env=env,
            ports={},
            healthcheck_argv=_healthcheck_argv(service["test"], name, names, skipped, ports, path_map),
            depends_on=service["depends_on"],
        ))
    for service in result:
        service.ports = {port: local for (owner, port), local in ports.by_key.items() if owner == service.name}
    return result


def _healthcheck_argv(test: Any, owner: str, names: set[str], skipped: set[str], ports: _PortMap,
                      path_map: Mapping[str, str]) -> list[str] | None:
    if not test:
        return None
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    kind, *rest = [str(t) for t in test]
    if kind == "NONE":
        return None
    rest = [_rewrite_token(t, owner, names, skipped, ports, path_map) for t in rest]
    if kind == "CMD-SHELL":
        return ["sh", "-c", " ".join(rest)]
    if kind != "CMD":
        raise ValueError(f"service {owner!r}: healthcheck test must start with CMD or CMD-SHELL, got {kind!r}")
    return rest

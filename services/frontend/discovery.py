"""Finds workers while the frontend runs, so scaling a Deployment needs no frontend restart.

    --decode-discovery dns:tandem-decode:50071   every A and AAAA record of the name (a headless Service)
    --decode-discovery file:/etc/tandem/decode   one host:port per line ('#' starts a comment), re-read each refresh

    every refresh:  source.addresses() ─► wanted = static addresses ∪ discovered
                    ─► Router.add_worker(new)       routed to from its first ready GetStats on
                    ─► Router.retire_worker(gone)   drained: no new request, those in flight finish

A source that cannot answer (a DNS timeout, an unreadable or malformed file) keeps the set it gave last
and logs why: a flaky resolver never drains a healthy cluster. A name that no longer exists (NXDOMAIN:
a headless Service with no ready pod) is an empty set, as is an empty file. Static addresses
(`--prefill-addresses`, `--decode-addresses`) are never retired.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.frontend.router import ROLES, Router

logger = logging.getLogger(__name__)

DNS_SCHEME = "dns:"
FILE_SCHEME = "file:"
DEFAULT_REFRESH_SECONDS = 1.0
# getaddrinfo failures that mean "no such name or no address": the source is empty, not failing
_NO_ADDRESS_ERRORS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}

# resolve(host, port) -> getaddrinfo-style tuples (family, type, proto, canonname, sockaddr)
Resolver = Callable[[str, int], Awaitable[list[tuple]]]


class DiscoveryError(Exception):
    """A source could not say which workers exist right now (its last answer stands)."""


def grpc_address(ip: str, port: int) -> str:
    """A gRPC target for an IP: IPv6 addresses are bracketed."""
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"


def check_address(address: str, where: str) -> str:
    """`address` if it is host:port (host non-empty, port 1..65535); ValueError naming `where` otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{where}: expected host:port, got {address!r}")
    return address


async def _system_resolve(host: str, port: int) -> list[tuple]:
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)


@dataclass
class DnsSource:
    """Every address a name resolves to (A and AAAA), each with the same port."""

    host: str
    port: int
    resolve: Resolver = _system_resolve

    def __str__(self) -> str:
        return f"{DNS_SCHEME}{self.host}:{self.port}"

    async def addresses(self) -> frozenset[str]:
        try:
            infos = await self.resolve(self.host, self.port)
        except socket.gaierror as error:
            if error.errno in _NO_ADDRESS_ERRORS:
                return frozenset()
            raise DiscoveryError(f"resolving {self.host}: {error}") from None
        except OSError as error:
            raise DiscoveryError(f"resolving {self.host}: {error}") from None
        return frozenset(grpc_address(info[4][0], self.port) for info in infos
                         if info[0] in (socket.AF_INET, socket.AF_INET6))


@dataclass
class FileSource:
    """The addresses listed in a file, read at every refresh and parsed again when its text changed (a
    small file: reading it beats trusting mtimes, which some filesystems keep to the second)."""

    path: str
    _text: str | None = field(default=None, init=False, repr=False)
    _last: frozenset[str] = field(default=frozenset(), init=False, repr=False)

    def __str__(self) -> str:
        return f"{FILE_SCHEME}{self.path}"

    async def addresses(self) -> frozenset[str]:
        try:
            with open(self.path, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as error:
            raise DiscoveryError(f"reading {self.path}: {getattr(error, 'strerror', None) or error}") from None
        if text != self._text:
            self._last = parse_address_list(text, self.path)  # DiscoveryError: the last set stands
            self._text = text
        return self._last


def parse_address_list(text: str, path: str) -> frozenset[str]:
    """One host:port per line; blank lines and '#' comments are skipped. DiscoveryError naming the line
    for anything else."""
    addresses = set()
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            addresses.add(check_address(entry, f"{path}:{number}"))
        except ValueError as error:
            raise DiscoveryError(str(error)) from None
    return frozenset(addresses)


Source = DnsSource | FileSource


def parse_source(spec: str, flag: str) -> Source:
    """`dns:HOST:PORT` or `file:PATH`; ValueError naming `flag` otherwise."""
    if spec.startswith(DNS_SCHEME):
        address = spec[len(DNS_SCHEME):]
        check_address(address, flag)
        host, _, port = address.rpartition(":")
        return DnsSource(host.strip("[]"), int(port))
    if spec.startswith(FILE_SCHEME) and spec[len(FILE_SCHEME):]:
        return FileSource(spec[len(FILE_SCHEME):])
    raise ValueError(f"{flag}: expected dns:HOST:PORT or file:PATH, got {spec!r}")


@dataclass(frozen=True)
class DiscoveryConfig:
    prefill: str | None = None  # dns:HOST:PORT or file:PATH for prefill workers; None = static addresses only
    decode: str | None = None  # the same for decode workers and colocated `tandem worker`s
    refresh_seconds: float = DEFAULT_REFRESH_SECONDS  # how often every source is read again

    def __post_init__(self) -> None:
        for role in ROLES:
            spec = getattr(self, role)
            if spec is not None:
                parse_source(spec, f"{role}_discovery")
        if not self.refresh_seconds > 0:
            raise ValueError(f"discovery_refresh_seconds: must be > 0, got {self.refresh_seconds}")

    @property
    def is_enabled(self) -> bool:
        return self.prefill is not None or self.decode is not None

    def sources(self) -> dict[str, Source]:
        return {role: parse_source(getattr(self, role), f"{role}_discovery")
                for role in ROLES if getattr(self, role) is not None}


class WorkerDiscovery:
    """Keeps the router's workers equal to the static addresses plus what the sources find."""

    def __init__(self, router: Router, sources: dict[str, Source], static_addresses: dict[str, list[str]],
                 refresh_seconds: float = DEFAULT_REFRESH_SECONDS):
        self._router = router
        self._sources = sources
        self._static = {role: frozenset(static_addresses.get(role, ())) for role in ROLES}
        self._refresh_seconds = refresh_seconds
        self._failing: set[str] = set()  # roles whose source failed last time (logged once per outage)
        self._task: asyncio.Task | None = None

    async def refresh(self) -> None:
        """Reads every source once and adds or retires workers to match."""
        for role, source in self._sources.items():
            try:
                found = await source.addresses()
            except DiscoveryError as error:
                if role not in self._failing:
                    logger.warning("%s discovery (%s) failed, keeping the workers it found last: %s",
                                   role, source, error)
                self._failing.add(role)
                continue
            if role in self._failing:
                logger.info("%s discovery (%s) answers again", role, source)
                self._failing.discard(role)
            self._apply(role, self._static[role] | found)

    def _apply(self, role: str, wanted: frozenset[str]) -> None:
        known = {worker.address for worker in self._router.workers_of(role)}
        for address in sorted(wanted - known):
            self._router.add_worker(role, address)
        for address in sorted(known - wanted):
            self._router.retire_worker(role, address)

    async def _refresh_forever(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_seconds)

    async def start(self) -> None:
        """The first reading happens before this returns, so the router starts with what exists."""
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

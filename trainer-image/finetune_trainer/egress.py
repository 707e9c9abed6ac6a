"""Outbound HTTP with a credential to a host the spec names: the reference model, and the MLflow tracking
server (tracking.py checks its URI with ``check_resolved`` before MLflow's client sends the token).

The rules, each enforced here (docs/security.md):

* https only, unless the operator's configuration allows plain http for the host
  (``reference.allowPlainHttpHosts`` → ``referencePolicy.allowPlainHttpHosts`` in ``FTJ_CONFIG``);
* never a link-local or cloud metadata address (169.254.0.0/16, fe80::/10, fd00:ec2::254). The host name is
  resolved here and the connection goes to the address that was checked, so a DNS name pointing there (or
  re-pointed between the check and the connection) is refused too;
* redirects are never followed: a 3xx answer is an error, so the key reaches no other origin;
* no user:password@ in the URL, and no proxy (``HTTPS_PROXY`` is not used: the key goes to the endpoint only).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance metadata services (AWS, GCP, Azure, OpenStack: 169.254.169.254; AWS IPv6: fd00:ec2::254) and the
# rest of link-local, where nothing a fine-tuning job should talk to lives.
FORBIDDEN_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
)
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


class RefusedEndpoint(ValueError):
    """The endpoint breaks the egress rules above; nothing was sent to it."""


class HttpStatusError(OSError):
    """The endpoint answered 4xx/5xx: the status, its Retry-After (seconds, when given) and the start of the
    body (for callers that adapt, e.g. a judge that does not support ``response_format``)."""

    def __init__(self, status: int, reason: str, retry_after: float | None = None, body: str = "") -> None:
        super().__init__(f"HTTP Error {status}: {reason}")
        self.status, self.retry_after, self.body = status, retry_after, body


# In-cluster Service names: plain http to them stays inside the cluster (a judge on a ModelServer pool).
CLUSTER_SERVICE_HOSTS = ("*.svc", "*.svc.cluster.local")


def judge_allowance(allow_plain_http_hosts: Sequence[str]) -> PlainHttpAllowance:
    """Where plain http may carry a judge key: the operator's allowed hosts plus in-cluster Services."""
    return PlainHttpAllowance.parse([*allow_plain_http_hosts, *CLUSTER_SERVICE_HOSTS])


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:  # an HTTP date: not worth parsing, the caller's backoff applies
        return None


@dataclass(frozen=True)
class PlainHttpAllowance:
    """Hosts plain http may reach: exact names, ``*.suffix`` wildcards, IP addresses and CIDR networks."""

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Sequence[str]) -> PlainHttpAllowance:
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().lower().strip("[]")
            if not entry:
                continue
            if entry.startswith("*."):
                suffixes.append(entry[1:])
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.add(entry.rstrip("."))
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    def allows_name(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return host in self.names or any(host.endswith(suffix) for suffix in self.suffixes)

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks if address.version == network.version)


def _plain(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forbidden(address: IPAddress) -> str | None:
    """Why the evaluator must not connect to ``address`` (None when it may)."""
    address = _plain(address)
    for network in FORBIDDEN_NETWORKS:
        if address.version == network.version and address in network:
            return f"{address} is a link-local or cloud metadata address ({network})"
    return None


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def check_url(url: str, allowance: PlainHttpAllowance) -> Endpoint:
    """What can be decided without the network: scheme, userinfo, literal addresses, the http allowance."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RefusedEndpoint(f"{url!r} is not a valid URL ({exc})") from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in ("https", "http") or not host:
        raise RefusedEndpoint(f"{url!r}: expected an https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise RefusedEndpoint(f"{scheme}://{host}: credentials in the URL are not allowed (use apiKeySecret)")
    literal = _literal(host)
    if literal is not None and (why := forbidden(literal)):
        raise RefusedEndpoint(f"{scheme}://{host}: {why}")
    if scheme == "http" and not _http_may_be_allowed(host, literal, allowance):
        raise RefusedEndpoint(
            f"http://{host}: plain http is not allowed for this host; use https, or ask the platform team to "
            "add it to the operator's reference.allowPlainHttpHosts"
        )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Endpoint(scheme, host, port or (443 if scheme == "https" else 80), path)


def _http_may_be_allowed(host: str, literal: IPAddress | None, allowance: PlainHttpAllowance) -> bool:
    if allowance.allows_name(host):
        return True
    if literal is not None:
        return allowance.allows_address(_plain(literal))
    return bool(allowance.networks)  # a name: decided on the addresses it resolves to


def _resolve_checked(endpoint: Endpoint, host: str, port: int, allowance: PlainHttpAllowance) -> list[Any]:
    """getaddrinfo of ``host``, refused when any address breaks the rules above."""
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    for candidate in addresses:
        if why := forbidden(candidate):
            raise RefusedEndpoint(f"{endpoint.scheme}://{host} resolves to {why}")
    if endpoint.scheme == "http" and not (
        allowance.allows_name(host) or all(allowance.allows_address(_plain(a)) for a in addresses)
    ):
        raise RefusedEndpoint(
            f"http://{host} resolves to {', '.join(map(str, addresses))}, outside the operator's "
            "reference.allowPlainHttpHosts; use https"
        )
    return infos


def check_resolved(url: str, allowance: PlainHttpAllowance) -> Endpoint:
    """check_url, then the addresses the host resolves to now: for clients that connect by name themselves
    (MLflow's), where the check cannot be pinned to the connection. DNS errors propagate (OSError)."""
    endpoint = check_url(url, allowance)
    _resolve_checked(endpoint, endpoint.host, endpoint.port, allowance)
    return endpoint


def _checked_connector(endpoint: Endpoint, allowance: PlainHttpAllowance) -> Any:
    """A ``create_connection`` that resolves, checks every address, and connects only to checked ones."""

    def connect(address: tuple[str, int], timeout: Any = None, source_address: Any = None) -> socket.socket:
        host, port = address
        infos = _resolve_checked(endpoint, host, port, allowance)
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                if isinstance(timeout, int | float):
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error or OSError(f"cannot connect to {host}:{port}")

    return connect


def post_json(
    url: str,
    payload: Any,
    *,
    allowance: PlainHttpAllowance,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Any:
    """POST ``payload`` as JSON to ``url`` under the rules above and return the decoded JSON answer."""
    endpoint = check_url(url, allowance)
    cls = http.client.HTTPSConnection if endpoint.scheme == "https" else http.client.HTTPConnection
    conn = cls(endpoint.host, endpoint.port, timeout=timeout)
    conn._create_connection = _checked_connector(endpoint, allowance)  # type: ignore[attr-defined]
    try:
        body = json.dumps(payload).encode()
        conn.request(
            "POST", endpoint.path, body=body, headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = conn.getresponse()
        if 300 <= response.status < 400:
            location = response.getheader("Location", "")
            raise RefusedEndpoint(
                f"{endpoint.origin} answered {response.status} redirecting to {location or '(no Location)'}; "
                f"redirects are not followed (the API key is sent to {endpoint.origin} only)"
            )
        data = response.read(MAX_RESPONSE_BYTES + 1)
        if response.status >= 400:
            raise HttpStatusError(
                response.status,
                response.reason,
                _retry_after(response.getheader("Retry-After")),
                data[:2000].decode("utf-8", "replace"),
            )
        if len(data) > MAX_RESPONSE_BYTES:
            raise ValueError(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            return json.loads(data)
        except RecursionError:  # a hostile endpoint's deeply nested answer is a bad answer, not a crash
            raise ValueError("answer nested too deeply to parse") from None
    finally:
        conn.close()

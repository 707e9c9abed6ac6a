"""Loaded by every Python process the local kubelet starts (PYTHONPATH): emulates the pod network.

- Cluster DNS: `<svc>.<ns>.svc[.cluster.local]`, `<svc>.<ns>` and `<svc>` (the pod's namespace, as the
  resolv.conf search path does) resolve to the Service's loopback ClusterIP from the kubelet's DNS map file;
  a headless Service's name to its pods' IPs, and `<hostname>.<svc>[.<ns>...]` to the pod with that
  hostname and `subdomain`.
- Pod loopback: a connection to 127.0.0.1/localhost on a port a container of the pod declares goes to the
  pod's IP, where that container listens (containers of one pod share a network namespace in Kubernetes).
- Pod IP: a server binding the wildcard address (0.0.0.0, "", ::) binds the pod's own loopback IP instead, so
  two pods listening on the same port do not clash, as they would not in real network namespaces.
Only active when LOCALCLUSTER_DNS_FILE is set; anything else resolves and binds normally.
"""

import json
import os
import socket

_DNS_FILE = os.environ.get("LOCALCLUSTER_DNS_FILE")
_POD_IP = os.environ.get("LOCALCLUSTER_POD_IP")
_NAMESPACE = os.environ.get("LOCALCLUSTER_POD_NAMESPACE", "default")
_POD_PORTS = frozenset(int(p) for p in os.environ.get("LOCALCLUSTER_POD_PORTS", "").split(",") if p.isdigit())
_cache = {"mtime": None, "map": {}}


def _dns_map():
    try:
        mtime = os.stat(_DNS_FILE).st_mtime_ns
    except OSError:
        return {}
    if mtime != _cache["mtime"]:
        try:
            with open(_DNS_FILE) as fh:
                _cache["map"] = json.load(fh)
            _cache["mtime"] = mtime
        except (OSError, ValueError):
            pass
    return _cache["map"]


def _lookup(host):
    if not isinstance(host, str) or not host or host[0].isdigit() or host == "localhost":
        return None
    name = host.rstrip(".").lower()
    table = _dns_map()
    # resolv.conf's search path in a pod: <ns>.svc.cluster.local, svc.cluster.local, cluster.local
    candidates = [name]
    if not name.endswith(".cluster.local"):
        candidates = [f"{name}.{_NAMESPACE}.svc.cluster.local", f"{name}.svc.cluster.local"]
        candidates += [f"{name}.cluster.local", name]
    for candidate in candidates:
        ips = table.get(candidate)
        if ips:
            return ips
    return None


if _DNS_FILE:
    _getaddrinfo = socket.getaddrinfo
    _gethostbyname = socket.gethostbyname
    _gethostbyname_ex = socket.gethostbyname_ex
    _bind = socket.socket.bind

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        ips = _lookup(host.decode() if isinstance(host, bytes) else host)
        if ips is not None:
            out = []
            for ip in ips:
                out.extend(
                    _getaddrinfo(
                        ip,
                        port,
                        socket.AF_INET if family in (0, socket.AF_INET) else family,
                        type,
                        proto,
                        flags,
                    )
                )
            return out
        if (
            host is None
            and flags & socket.AI_PASSIVE
            and _POD_IP
            and family in (0, socket.AF_INET, socket.AF_UNSPEC)
        ):
            return _getaddrinfo(_POD_IP, port, socket.AF_INET, type, proto, flags)
        return _getaddrinfo(host, port, family, type, proto, flags)

    def gethostbyname(host):
        ips = _lookup(host)
        return ips[0] if ips else _gethostbyname(host)

    def gethostbyname_ex(host):
        ips = _lookup(host)
        return (host, [], list(ips)) if ips else _gethostbyname_ex(host)

    def bind(self, address):
        if _POD_IP and isinstance(address, tuple) and self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if self.family == socket.AF_INET and host in ("", "0.0.0.0"):
                address = (_POD_IP, *address[1:])
            elif self.family == socket.AF_INET6 and host in ("", "::"):
                address = (f"::ffff:{_POD_IP}", *address[1:])
        return _bind(self, address)

    _connect = socket.socket.connect

    def connect(self, address):
        if (
            _POD_IP
            and _POD_PORTS
            and isinstance(address, tuple)
            and self.family == socket.AF_INET
            and address[0] in ("127.0.0.1", "localhost")
            and address[1] in _POD_PORTS
        ):
            address = (_POD_IP, *address[1:])
        return _connect(self, address)

    socket.socket.connect = connect
    socket.getaddrinfo = getaddrinfo
    socket.gethostbyname = gethostbyname
    socket.gethostbyname_ex = gethostbyname_ex
    socket.socket.bind = bind

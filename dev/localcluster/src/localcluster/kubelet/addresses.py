"""Loopback address plan of one cluster, so several clusters (a `make local-cluster`, test sessions) can
run on one machine without their pods or Services clashing.

A cluster claims one octet A of 127.0.0.0/8 by holding a listening socket on 127.A.0.254:65432 for its whole
life, then uses: nodes 127.A.0.(i+1), the host-run operator 127.A.0.200, pods 127.A.1.1 to 127.A.127.254,
Service ClusterIPs 127.A.128.1 to 127.A.254.254.
"""

from __future__ import annotations

import socket

_CLAIM_PORT = 65432
_PER_OCTET = 254


class AddressBlock:
    def __init__(self, octet: int, claim: socket.socket | None = None):
        self.octet = octet
        self._claim = claim
        self._next_pod = 0
        self._next_service = 0

    @classmethod
    def claim(cls, first: int = 1) -> AddressBlock:
        """Claim the first free octet from `first` (1: the 127.1.x.y plan of a lone `make local-cluster`)."""
        for octet in [*range(first, 255), *range(2, first)]:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((f"127.{octet}.0.254", _CLAIM_PORT))
                sock.listen(1)
            except OSError:
                sock.close()
                continue
            return cls(octet, sock)
        raise RuntimeError("no free 127.x.0.0/16 block for another local cluster")

    def release(self) -> None:
        if self._claim is not None:
            self._claim.close()
            self._claim = None

    def node_ip(self, index: int) -> str:
        return f"127.{self.octet}.0.{index + 1}"

    @property
    def operator_ip(self) -> str:
        return f"127.{self.octet}.0.200"

    def pod_ip(self) -> str:
        n = self._next_pod % (127 * _PER_OCTET)
        self._next_pod += 1
        return f"127.{self.octet}.{1 + n // _PER_OCTET}.{1 + n % _PER_OCTET}"

    def service_ip(self) -> str:
        n = self._next_service % (127 * _PER_OCTET)
        self._next_service += 1
        return f"127.{self.octet}.{128 + n // _PER_OCTET}.{1 + n % _PER_OCTET}"

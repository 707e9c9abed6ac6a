"""Kubernetes API server emulator (asyncio, in memory) for the embedded local cluster."""

from .errors import ApiError
from .faults import Fault, RequestCounters
from .kubeconfig import kubeconfig_dict, write_kubeconfig
from .server import ApiServer, LogProvider

__all__ = [
    "ApiError",
    "ApiServer",
    "Fault",
    "LogProvider",
    "RequestCounters",
    "kubeconfig_dict",
    "write_kubeconfig",
]

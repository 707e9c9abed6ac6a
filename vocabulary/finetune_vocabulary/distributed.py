"""How the pods of a multi-GPU / multi-node training Job find each other: the environment the operator sets
and the trainer reads, stated once.

One pod per node (``resources.nodes``), ``resources.gpus`` processes per pod (torchrun
``--nproc-per-node``). With several nodes the training Job is an Indexed Job: Kubernetes gives each pod its
index in ``JOB_COMPLETION_INDEX`` (the node rank) and, through the Job's headless Service and the pod's
``subdomain``, the stable hostname ``<job>-<index>.<service>``; rank 0's (index 0) hosts torch's c10d
TCPStore that the others rendezvous at.
"""

from __future__ import annotations

NNODES_ENV = "FTJ_NNODES"  # pods taking part (resources.nodes)
NPROC_PER_NODE_ENV = "FTJ_NPROC_PER_NODE"  # processes per pod (resources.gpus, or an override on CPU)
MASTER_ADDR_ENV = "FTJ_MASTER_ADDR"  # rank 0's stable hostname, <job>-0.<service>
MASTER_PORT_ENV = "FTJ_MASTER_PORT"
NODE_RANK_ENV = "JOB_COMPLETION_INDEX"  # set by the Job controller in every pod of an Indexed Job
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
RENDEZVOUS_TIMEOUT_ENV = "FTJ_RENDEZVOUS_TIMEOUT"  # seconds to wait for rank 0's hostname to resolve

DEFAULT_MASTER_PORT = 29500
DEFAULT_RENDEZVOUS_TIMEOUT_S = 600
MAX_NODES = 16
STRATEGIES = ("auto", "ddp", "fsdp")


def world_size(nodes: int, gpus: int) -> int:
    """Data-parallel ranks: one process per GPU on every node (one process when CPU only)."""
    return max(1, nodes) * max(1, gpus)


def pod_hostname(job_name: str, index: int) -> str:
    """The hostname Kubernetes gives pod ``index`` of an Indexed Job (``spec.hostname`` left unset)."""
    return f"{job_name}-{index}"


def master_addr(job_name: str, service: str) -> str:
    """Rank 0's stable DNS name: its hostname under the headless Service (search path: the namespace)."""
    return f"{pod_hostname(job_name, 0)}.{service}"

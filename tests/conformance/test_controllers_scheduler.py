"""Scheduler filters and kube-scheduler's FailedScheduling wording (pure functions)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from localcluster.controllers.scheduler import (
    filter_node,
    matches_node_affinity,
    tolerates,
    unschedulable_message,
)
from localcluster.kubelet.nodes import NodeConfig, default_nodes, node_manifest
from localcluster.kubelet.quantity import parse_quantity, pod_requests

GPU_TAINT = {"key": "nvidia.com/gpu", "effect": "NoSchedule"}


@pytest.mark.parametrize(
    ("toleration", "ok"),
    [
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, True),
        ({"key": "nvidia.com/gpu", "operator": "Exists"}, True),
        ({"operator": "Exists"}, True),
        ({"key": "nvidia.com/gpu", "operator": "Equal", "value": "", "effect": "NoSchedule"}, True),
        ({"key": "nvidia.com/gpu", "operator": "Equal", "value": "x"}, False),
        ({"key": "other", "operator": "Exists"}, False),
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}, False),
    ],
)
def test_tolerations(toleration, ok):
    assert tolerates([toleration], GPU_TAINT) is ok


def test_required_node_affinity_and_node_selector():
    node = node_manifest(NodeConfig.gpu("g0"))
    term = {
        "matchExpressions": [
            {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-A100-SXM4-80GB"]}
        ]
    }
    affinity = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}
    }
    assert matches_node_affinity({"affinity": affinity}, node)
    assert not matches_node_affinity({"nodeSelector": {"nvidia.com/gpu.product": "H100"}}, node)
    gt = {"matchExpressions": [{"key": "nvidia.com/gpu.count", "operator": "Gt", "values": ["8"]}]}
    affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] = [gt]
    assert not matches_node_affinity({"affinity": affinity}, node)


def test_resource_fit_counts_running_pods_and_reports_every_shortage():
    node = node_manifest(NodeConfig("c0", cpu="4", memory="8Gi"))
    pod = {"spec": {"containers": [{"resources": {"requests": {"cpu": "3", "memory": "6Gi"}}}]}}
    assert filter_node(pod, node, {}, 0) == []
    used = {"cpu": Fraction(2), "memory": parse_quantity("4Gi")}
    assert filter_node(pod, node, used, 1) == ["Insufficient cpu", "Insufficient memory"]


def test_requests_take_the_larger_of_containers_and_init_containers():
    spec = {
        "containers": [{"resources": {"requests": {"cpu": "500m"}}}, {"resources": {"limits": {"cpu": "1"}}}],
        "initContainers": [{"resources": {"requests": {"cpu": "2", "memory": "1Gi"}}}],
    }
    assert pod_requests(spec) == {"cpu": Fraction(2), "memory": Fraction(2**30)}


def test_message_reads_like_kube_scheduler():
    nodes = {n.name: node_manifest(n) for n in default_nodes()}
    pod = {"spec": {"containers": [{"resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}
    per_node = {name: filter_node(pod, node, {}, 0) for name, node in nodes.items()}
    assert unschedulable_message(per_node) == (
        "0/3 nodes are available: 1 Insufficient nvidia.com/gpu, 2 node(s) had untolerated taint "
        "{nvidia.com/gpu: }. preemption: 0/3 nodes are available: 1 No preemption victims found for incoming "
        "pod, "
        "2 Preemption is not helpful for scheduling."
    )


@pytest.mark.parametrize("bad", ["12x", "", "1.2.3Gi", "Gi"])
def test_bad_quantities_name_the_value(bad):
    with pytest.raises(ValueError, match=repr(bad).replace("(", "\\(")):
        parse_quantity(bad)

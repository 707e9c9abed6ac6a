"""The emulator's test controls: injected errors, latency, watch drops, pause, and request counters."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from .conftest import Cluster, Raw

pytestmark = pytest.mark.emulator


def cm(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {}}


def test_injected_errors_match_verb_resource_and_count(
    raw: Raw, namespace: str, cluster: Cluster, emulator: Any
) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    fault = cluster.call(lambda: emulator.add_fault("create", "configmaps", 429, count=1, retry_after=3))
    try:
        status, body, headers = raw.request("POST", path, cm("a"))
        assert (status, body["reason"], headers["Retry-After"]) == (429, "TooManyRequests", "3")
        assert raw.request("POST", path, cm("a"))[0] == 201  # count exhausted
        cluster.call(lambda: emulator.add_fault("patch", "configmaps", 409, count=1))
        status, body, _ = raw.request(
            "PATCH", f"{path}/a", {"data": {"x": "y"}}, "application/merge-patch+json"
        )
        assert (status, body["reason"]) == (409, "Conflict")
        cluster.call(lambda: emulator.add_fault("get", "*", 500, rate=1.0, namespace=namespace))
        status, body, _ = raw.request("GET", f"{path}/a")
        assert (status, body["reason"]) == (500, "InternalError")
        assert (
            raw.request("GET", "/api/v1/namespaces/default/configmaps")[0] == 200
        )  # other namespace unaffected
    finally:
        cluster.call(emulator.clear_faults)
    assert fault.hits == 1
    assert raw.request("GET", f"{path}/a")[0] == 200


def test_counters_count_requests_and_writes_by_verb_and_resource(
    raw: Raw, namespace: str, cluster: Cluster, emulator: Any
) -> None:
    before = dict(emulator.counters.writes)
    agent = "python-urllib3"  # the User-Agent product of these raw requests
    agent_writes = emulator.counters.total_writes("configmaps", agent=agent)
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    raw.request("POST", path, cm("counted"))
    raw.request("PATCH", f"{path}/counted", {"data": {"a": "b"}}, "application/merge-patch+json")
    raw.request("GET", f"{path}/counted")
    raw.request("DELETE", f"{path}/counted")
    after = emulator.counters.writes
    for verb in ("create", "patch", "delete"):
        assert after[(verb, "configmaps")] - before.get((verb, "configmaps"), 0) == 1
    assert ("get", "configmaps") not in after
    assert emulator.counters.requests[("get", "configmaps")] >= 1
    assert emulator.counters.total_writes("configmaps", agent=agent) - agent_writes == 3


def test_latency_pause_and_watch_drop(raw: Raw, namespace: str, cluster: Cluster, emulator: Any) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    cluster.call(lambda: emulator.set_latency(0.3, verb="list"))
    try:
        started = time.monotonic()
        raw.request("GET", path)
        assert time.monotonic() - started >= 0.3
    finally:
        cluster.call(emulator.clear_faults)

    cluster.call(emulator.pause)
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(raw.request("GET", path)[0]))
    worker.start()
    time.sleep(0.3)
    assert result == []  # held while paused
    cluster.call(emulator.resume)
    worker.join(5)
    assert result == [200]

    status, _, response = raw.request("GET", f"{path}?watch=true&timeoutSeconds=30", preload=False)
    assert status == 200
    time.sleep(0.2)
    started = time.monotonic()
    assert cluster.call(lambda: emulator.drop_watches("configmaps")) >= 1
    response.read()  # the stream ends instead of running 30 s
    assert time.monotonic() - started < 5
    response.release_conn()


def test_pod_logs_come_from_the_registered_provider(
    raw: Raw, namespace: str, cluster: Cluster, emulator: Any
) -> None:
    pods = f"/api/v1/namespaces/{namespace}/pods"
    raw.request(
        "POST",
        pods,
        {
            "metadata": {"name": "logger"},
            "spec": {
                "nodeSelector": {"conformance.example.com/no-such-node": "true"},
                "containers": [{"name": "a", "image": "busybox"}, {"name": "b", "image": "busybox"}],
            },
        },
    )
    calls: list[tuple[Any, ...]] = []

    def provider(ns: str, pod: str, container: str, **options: Any) -> str:
        calls.append((ns, pod, container, options["tail"], options["follow"]))
        return "one\ntwo\n"

    previous = emulator.log_provider
    try:
        emulator.log_provider = None  # no kubelet: the container never started
        status, body, _ = raw.request("GET", f"{pods}/logger/log?container=a")
        assert status == 400 and "waiting to start" in body["message"]
        emulator.log_provider = provider
        status, body, _ = raw.request("GET", f"{pods}/logger/log")
        assert status == 400 and "choose one of: [a b]" in body["message"]
        status, body, _ = raw.request("GET", f"{pods}/logger/log?container=zzz")
        assert status == 400 and "not valid for pod logger" in body["message"]
        status, body, _ = raw.request("GET", f"{pods}/logger/log?container=b&tailLines=1", accept="*/*")
        assert status == 200 and body == "one\ntwo\n"
        assert calls == [(namespace, "logger", "b", 1, False)]
    finally:
        emulator.log_provider = previous


def test_bearer_token_over_tls_works_with_kubectl_and_is_required(
    cluster: Cluster, emulator: Any, tmp_path: Any
) -> None:
    import json
    import ssl
    import subprocess
    import urllib.error
    import urllib.request

    from localcluster.apiserver import ApiServer, write_kubeconfig

    secured = ApiServer(token="s3cr3t", tls=True)
    assert cluster.run_on_loop is not None
    cluster.run_on_loop(secured.start())
    try:
        assert secured.url.startswith("https://") and secured.ca_pem
        trust = ssl.create_default_context(cadata=secured.ca_pem.decode())
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{secured.url}/api/v1/namespaces", timeout=5, context=trust)
        assert info.value.code == 401 and json.loads(info.value.read())["reason"] == "Unauthorized"
        kubeconfig = secured.write_kubeconfig(str(tmp_path / "kubeconfig"))
        out = subprocess.run(
            [
                "/usr/bin/kubectl",
                f"--kubeconfig={kubeconfig}",
                f"--cache-dir={tmp_path / 'cache'}",
                "get",
                "ns",
                "-o",
                "name",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert "namespace/default" in out.stdout.split()
        # Over https kubectl also sends ServiceAccount tokens: a token kubeconfig is that account, RBAC-bound.
        kubectl = ["/usr/bin/kubectl", f"--cache-dir={tmp_path / 'cache'}"]
        token = subprocess.run(
            [*kubectl, f"--kubeconfig={kubeconfig}", "create", "token", "default", "-n", "default"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert token.returncode == 0, token.stderr
        sa_config = write_kubeconfig(
            str(tmp_path / "sa-kubeconfig"), secured.url, token=token.stdout.strip(), ca_pem=secured.ca_pem
        )
        who = subprocess.run(
            [
                *kubectl,
                f"--kubeconfig={sa_config}",
                "auth",
                "whoami",
                "-o",
                "jsonpath={.status.userInfo.username}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert who.stdout == "system:serviceaccount:default:default", who.stderr
        refused = subprocess.run(
            [*kubectl, f"--kubeconfig={sa_config}", "get", "secrets", "-n", "default"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode != 0
        assert 'User "system:serviceaccount:default:default" cannot list resource "secrets"' in refused.stderr
    finally:
        cluster.run_on_loop(secured.stop())


def test_faults_and_latency_can_target_one_client_by_user_agent(
    raw: Raw, namespace: str, cluster: Cluster, emulator: Any
) -> None:
    """Chaos for the operator only (bench_chaos.py): other clients (kubelet, controllers) are unaffected."""
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    raw.request("POST", path, cm("agent"))
    fault = cluster.call(lambda: emulator.add_fault("get", "*", 500, agent=("kopf", "finetune-operator")))
    slow = cluster.call(lambda: emulator.set_latency(1.0, "get", rate=1.0, agent="kopf"))
    try:
        began = time.monotonic()
        assert raw.request("GET", f"{path}/agent")[0] == 200  # python-urllib3: neither faulted nor slowed
        assert time.monotonic() - began < 0.9
        assert fault.hits == 0 and slow.hits == 0
        request = urllib.request.Request(raw.cfg.host + f"{path}/agent", headers={"User-Agent": "kopf/1.4"})
        began = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 500 and time.monotonic() - began >= 1.0
        assert fault.hits == 1 and slow.hits == 1
    finally:
        cluster.call(emulator.clear_faults)
    rate_half = cluster.call(lambda: emulator.add_fault("get", "configmaps", 500, rate=0.5))
    try:
        codes = [raw.request("GET", f"{path}/agent")[0] for _ in range(40)]
    finally:
        cluster.call(emulator.clear_faults)
    assert 5 <= codes.count(500) <= 35 and rate_half.hits == codes.count(500)

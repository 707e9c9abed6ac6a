"""Local kubelet: pods run as local processes and report status, logs and termination like a kubelet."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest
from kubernetes import client, watch
from localcluster.pytest_plugin import condition, events, pod, pod_phase, wait_for

pytestmark = pytest.mark.local_kubelet
PY = sys.executable


@pytest.fixture
def ns(lc_namespace):
    return lc_namespace


def create_pod(api, ns, spec, name="p", labels=None):
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": spec,
    }
    client.CoreV1Api(api).create_namespaced_pod(ns, body)
    return name


def test_failed_pod_reports_exit_code_and_logs(lc_api, ns, lc_kubectl):
    lc_kubectl(
        "run",
        "hello",
        "--image=busybox",
        "--restart=Never",
        "--",
        "sh",
        "-c",
        "echo hello; exit 3",
        namespace=ns,
    )
    done = wait_for(lambda: pod_phase(lc_api, ns, "hello"), what="pod to finish")
    assert done["status"]["phase"] == "Failed"
    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"
    assert terminated["startedAt"] and terminated["finishedAt"]
    assert condition(done, "Ready")["status"] == "False"
    assert condition(done, "PodScheduled")["status"] == "True"
    assert done["status"]["podIP"].startswith("127.")
    assert lc_kubectl("logs", "hello", namespace=ns).stdout == "hello\n"


def test_test_cluster_pods_get_one_openmp_thread_unless_their_spec_sets_it(lc_api, ns):
    """The test session's cluster caps OpenMP/MKL threads per pod process (LOCALCLUSTER_POD_THREADS, 1):
    torch pods of two xdist workers on a 2-core host would otherwise spin against each other. A container's
    own env still wins."""
    threads = os.environ.get("LOCALCLUSTER_POD_THREADS", "1")
    if threads == "0":
        pytest.skip("LOCALCLUSTER_POD_THREADS=0: pods run with the libraries' default thread count")
    keys = ["OMP_NUM_THREADS", "MKL_NUM_THREADS"]
    script = f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {keys!r}}}))"
    for name, env in (("capped", []), ("own", [{"name": "OMP_NUM_THREADS", "value": "2"}])):
        create_pod(
            lc_api,
            ns,
            {
                "restartPolicy": "Never",
                "containers": [
                    {"name": "main", "image": "python:3.11", "command": [PY, "-c", script], "env": env}
                ],
            },
            name=name,
        )
    seen = {}
    for name in ("capped", "own"):
        done = wait_for(lambda name=name: pod_phase(lc_api, ns, name), what=f"pod {name} to finish")
        assert done["status"]["phase"] == "Succeeded", done["status"]
        seen[name] = json.loads(client.CoreV1Api(lc_api).read_namespaced_pod_log(name, ns))
    assert seen == {
        "capped": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
        "own": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": threads},
    }


def test_env_from_secret_configmap_and_downward_api(lc_api, ns, lc_kubectl_one):
    core = client.CoreV1Api(lc_api)
    core.create_namespaced_secret(
        ns, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cr3t", "USER": "alice"}}
    )
    core.create_namespaced_config_map(ns, {"metadata": {"name": "cfg"}, "data": {"mode": "fast"}})
    script = (
        "import json, os; print(json.dumps({k: os.environ.get(k) for k in "
        "['TOKEN', 'MODE', 'POD', 'NS', 'IP', 'NODE', 'APP', 'USER', 'GREETING', 'CUDA_VISIBLE_DEVICES']}))"
    )
    create_pod(
        lc_api,
        ns,
        {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "python:3.11",
                    "command": [PY, "-c", script],
                    "envFrom": [{"secretRef": {"name": "creds"}}],
                    "env": [
                        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
                        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                        {"name": "GREETING", "value": "hi $(POD) $$(POD)"},
                    ],
                }
            ],
        },
        labels={"app": "envtest"},
    )
    done = wait_for(lambda: pod_phase(lc_api, ns, "p"), what="pod to finish")
    assert done["status"]["phase"] == "Succeeded", json.dumps(done["status"]["containerStatuses"])
    seen = json.loads(lc_kubectl_one("logs", "p", namespace=ns).stdout)
    assert seen == {
        "TOKEN": "s3cr3t",
        "MODE": "fast",
        "POD": "p",
        "NS": ns,
        "IP": done["status"]["podIP"],
        "NODE": done["spec"]["nodeName"],
        "APP": "envtest",
        "USER": "alice",
        "GREETING": "hi p $(POD)",
        "CUDA_VISIBLE_DEVICES": "",
    }


def test_missing_secret_keeps_container_waiting(lc_api, ns):
    create_pod(
        lc_api,
        ns,
        {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": ["true"],
                    "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}],
                }
            ],
        },
    )

    def waiting():
        statuses = pod(lc_api, ns, "p").get("status", {}).get("containerStatuses") or []
        return statuses and statuses[0]["state"].get("waiting")

    state = wait_for(waiting, what="CreateContainerConfigError", timeout=15)
    wait_for(lambda: (waiting() or {}).get("reason") == "CreateContainerConfigError", timeout=15)
    assert 'secret "absent" not found' in waiting()["message"], state


def test_image_whose_runtime_is_missing_waits_in_image_pull_backoff_naming_the_command(
    lc_api, ns, local_cluster, monkeypatch, tmp_path
):
    """The local kubelet's image is its virtualenv: a missing one reads as kubelet's ErrImagePull /
    ImagePullBackOff with the cause and the command that installs it, retried until it is there."""
    missing = tmp_path / "no-vllm-venv"
    monkeypatch.setitem(local_cluster.kubelet.runtimes, "vllm/vllm-openai", missing)
    create_pod(
        lc_api,
        ns,
        {
            "restartPolicy": "Never",
            "containers": [
                {"name": "vllm", "image": "vllm/vllm-openai:v0.11.0", "command": ["python", "-c", "print(1)"]}
            ],
        },
    )

    def waiting(reason):
        obj = pod(lc_api, ns, "p")
        statuses = obj.get("status", {}).get("containerStatuses") or []
        state = statuses and statuses[0]["state"].get("waiting")
        return state if state and state.get("reason") == reason else None

    pulled = wait_for(lambda: waiting("ErrImagePull"), what="ErrImagePull", timeout=15)
    assert str(missing) in pulled["message"] and "make vllm-venv" in pulled["message"], pulled
    backoff = wait_for(lambda: waiting("ImagePullBackOff"), what="ImagePullBackOff", timeout=15)
    assert backoff["message"].startswith('Back-off pulling image "vllm/vllm-openai:v0.11.0": ErrImagePull: ')
    assert "make vllm-venv" in backoff["message"], backoff
    obj = pod(lc_api, ns, "p")
    assert obj["status"]["phase"] == "Pending"
    assert obj["status"]["containerStatuses"][0]["restartCount"] == 0
    reasons = {(e["reason"], e["message"]) for e in events(lc_api, ns, "p")}
    assert ("Failed", "Error: ErrImagePull") in reasons, reasons
    # Installed meanwhile: the next pull attempt finds it and the container runs.
    (missing / "bin").mkdir(parents=True)
    (missing / "bin" / "python").symlink_to(PY)
    done = wait_for(lambda: pod_phase(lc_api, ns, "p"), what="the pod to run once installed", timeout=30)
    assert done["status"]["phase"] == "Succeeded", done["status"]


def test_volumes_init_containers_and_termination_message(lc_api, ns):
    core = client.CoreV1Api(lc_api)
    core.create_namespaced_secret(ns, {"metadata": {"name": "vol-secret"}, "stringData": {"key.txt": "S"}})
    core.create_namespaced_config_map(ns, {"metadata": {"name": "vol-cm"}, "data": {"conf.yaml": "a: 1"}})
    # Programs see in-container paths only through args and env (rewritten by the local kubelet).
    append = (
        "import pathlib, sys; p = pathlib.Path(sys.argv[1]); "
        "p.write_text((p.read_text() if p.exists() else '') + sys.argv[2])"
    )
    main = (
        "import json, os, pathlib, sys; r = lambda p: pathlib.Path(p).read_text(); "
        "out = {'order': r(sys.argv[1]), 'secret': r(sys.argv[2]), 'cm': r(sys.argv[3]), "
        "'labels': r(sys.argv[4]), 'sub': r(sys.argv[5]), "
        "'shm': pathlib.Path(os.environ['SHM']).is_dir(), 'cwd': os.getcwd().endswith('/data/run')}; "
        "pathlib.Path(os.environ['TERM_LOG']).write_text(json.dumps(out))"
    )
    mounts = [{"name": "work", "mountPath": "/scratch"}]
    create_pod(
        lc_api,
        ns,
        {
            "restartPolicy": "Never",
            "initContainers": [
                {
                    "name": "init1",
                    "image": "busybox",
                    "command": [PY, "-c", append],
                    "args": ["/scratch/order.txt", "init1\n"],
                    "volumeMounts": mounts,
                },
                {
                    "name": "init2",
                    "image": "busybox",
                    "command": [PY, "-c", append],
                    "args": ["/scratch/order.txt", "init2\n"],
                    "volumeMounts": mounts,
                },
            ],
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": [PY, "-c", main],
                    "args": [
                        "/scratch/order.txt",
                        "/etc/secret/key.txt",
                        "/etc/cm/conf.yaml",
                        "/etc/podinfo/labels",
                        "/etc/app/conf.yaml",
                    ],
                    "workingDir": "/scratch/data/run",
                    "env": [
                        {"name": "SHM", "value": "/dev/shm"},
                        {"name": "TERM_LOG", "value": "/dev/termination-log"},
                    ],
                    "volumeMounts": [
                        *mounts,
                        {"name": "secret", "mountPath": "/etc/secret"},
                        {"name": "cm", "mountPath": "/etc/cm"},
                        {"name": "podinfo", "mountPath": "/etc/podinfo"},
                        {"name": "cm", "mountPath": "/etc/app/conf.yaml", "subPath": "conf.yaml"},
                        {"name": "shm", "mountPath": "/dev/shm"},
                    ],
                }
            ],
            "volumes": [
                {"name": "work", "emptyDir": {}},
                {"name": "secret", "secret": {"secretName": "vol-secret"}},
                {"name": "cm", "configMap": {"name": "vol-cm"}},
                {
                    "name": "podinfo",
                    "downwardAPI": {
                        "items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]
                    },
                },
                {"name": "shm", "emptyDir": {"medium": "Memory"}},
            ],
        },
        labels={"tier": "test"},
    )
    done = wait_for(lambda: pod_phase(lc_api, ns, "p"), what="pod to finish")
    status = done["status"]
    assert status["phase"] == "Succeeded", json.dumps(
        status.get("initContainerStatuses", []) + status["containerStatuses"]
    )
    assert [s["state"]["terminated"]["reason"] for s in status["initContainerStatuses"]] == ["Completed"] * 2
    message = json.loads(status["containerStatuses"][0]["state"]["terminated"]["message"])
    assert message == {
        "order": "init1\ninit2\n",
        "secret": "S",
        "cm": "a: 1",
        "labels": 'tier="test"',
        "shm": True,
        "cwd": True,
        "sub": "a: 1",
    }
    assert condition(done, "Ready")["reason"] == "PodCompleted"


def test_fallback_to_logs_on_error(lc_api, ns):
    create_pod(
        lc_api,
        ns,
        {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": ["sh", "-c", "echo first; echo boom >&2; exit 7"],
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                }
            ],
        },
    )
    done = wait_for(lambda: pod_phase(lc_api, ns, "p"), what="pod to finish")
    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 7
    assert terminated["message"] == "first\nboom\n"


def test_sixteen_gpus_stay_pending_with_scheduler_message(lc_api, ns):
    create_pod(
        lc_api,
        ns,
        {
            "containers": [
                {
                    "name": "main",
                    "image": "ghcr.io/finetune-operator/trainer:0.1.0",
                    "command": ["true"],
                    "resources": {"limits": {"nvidia.com/gpu": "16"}},
                }
            ],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        name="big",
    )
    create_pod(
        lc_api,
        ns,
        {
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": ["true"],
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                }
            ]
        },
        name="untolerated",
    )

    def unschedulable(name):
        cond = condition(pod(lc_api, ns, name), "PodScheduled")
        return cond if cond and cond["status"] == "False" else None

    big = wait_for(lambda: unschedulable("big"), what="PodScheduled=False")
    assert big["reason"] == "Unschedulable"
    assert big["message"] == (
        "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are "
        "available: 3 No preemption victims found for incoming pod."
    )
    other = wait_for(lambda: unschedulable("untolerated"), what="PodScheduled=False")
    assert other["message"] == (
        "0/3 nodes are available: 1 Insufficient nvidia.com/gpu, 2 node(s) had untolerated taint "
        "{nvidia.com/gpu: }. preemption: 0/3 nodes are available: 1 No preemption victims found for incoming "
        "pod, 2 Preemption is not helpful for scheduling."
    )
    assert pod(lc_api, ns, "big")["status"]["phase"] == "Pending"
    assert not pod(lc_api, ns, "big")["spec"].get("nodeName")
    assert any(
        e["reason"] == "FailedScheduling" and e["type"] == "Warning" for e in events(lc_api, ns, "big")
    )


def test_gpu_pod_lands_on_gpu_node_and_runs_on_cpu(lc_api, ns):
    create_pod(
        lc_api,
        ns,
        {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": ["sh", "-c", 'test -z "$CUDA_VISIBLE_DEVICES"'],
                    "resources": {"limits": {"nvidia.com/gpu": "8"}},
                }
            ],
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    )
    done = wait_for(lambda: pod_phase(lc_api, ns, "p"), what="pod to finish")
    assert done["spec"]["nodeName"].startswith("gpu-node-")
    assert done["status"]["phase"] == "Succeeded"


def watch_pod(api, ns, name):
    """Collect every version of a pod the API server streams, in a background thread, until it is deleted."""
    seen: list[dict] = []

    def run():
        stream = watch.Watch().stream(
            client.CoreV1Api(api).list_namespaced_pod,
            ns,
            field_selector=f"metadata.name={name}",
            timeout_seconds=30,
            _preload_content=False,
        )
        for event in stream:
            obj = event["raw_object"]
            seen.append(obj)
            if event["type"] == "DELETED":
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return seen, thread


def test_eviction_sends_sigterm_and_sets_disruption_target(lc_api, ns, tmp_path):
    marker = tmp_path / "sigterm"
    script = (
        "import pathlib, signal, sys, time\n"
        "def bye(*_):\n    pathlib.Path(sys.argv[1]).write_text('got SIGTERM'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\nprint('ready', flush=True)\ntime.sleep(60)\n"
    )
    create_pod(
        lc_api,
        ns,
        {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": [PY, "-u", "-c", script],
                    "args": [str(marker)],
                }
            ],
        },
    )
    wait_for(lambda: (condition(pod(lc_api, ns, "p"), "Ready") or {}).get("status") == "True", what="running")
    seen, watcher = watch_pod(lc_api, ns, "p")
    time.sleep(0.3)
    client.CoreV1Api(lc_api).create_namespaced_pod_eviction(
        "p", ns, {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "p", "namespace": ns}}
    )
    watcher.join(20)
    assert not watcher.is_alive(), "evicted pod was not removed"
    assert marker.read_text() == "got SIGTERM"
    final = [o for o in seen if o["status"].get("phase") in ("Succeeded", "Failed")]
    assert final, [o["status"].get("phase") for o in seen]
    last = final[-1]
    assert condition(last, "DisruptionTarget")["status"] == "True"
    assert condition(last, "DisruptionTarget")["reason"] == "EvictionByEvictionAPI"
    assert last["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert last["metadata"]["deletionTimestamp"]


def test_graceful_delete_escalates_to_sigkill(lc_api, ns):
    script = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
        "time.sleep(60)"
    )
    create_pod(
        lc_api,
        ns,
        {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": "busybox", "command": [PY, "-c", script]}],
        },
    )
    wait_for(lambda: pod(lc_api, ns, "p")["status"].get("phase") == "Running", what="running")
    client.CoreV1Api(lc_api).delete_namespaced_pod("p", ns)
    last = {}

    def gone():
        try:
            last["pod"] = pod(lc_api, ns, "p")
            return False
        except client.ApiException as err:
            return err.status == 404

    wait_for(gone, timeout=10, what="pod removed after SIGKILL")
    terminated = last["pod"]["status"]["containerStatuses"][0]["state"].get("terminated")
    if terminated:  # the last status the kubelet wrote before removing the pod
        assert terminated["exitCode"] == 137


def test_processes_a_container_leaves_behind_end_with_it(lc_api, ns, lc_kubectl_one):
    """A server forked by the main process does not outlive the container (its PID namespace would go)."""
    psutil = pytest.importorskip("psutil")
    script = (
        "import subprocess, sys; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "print(child.pid, flush=True)"
    )
    create_pod(
        lc_api,
        ns,
        {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox", "command": [PY, "-c", script]}],
        },
    )
    done = wait_for(lambda: pod_phase(lc_api, ns, "p"), what="pod to finish")
    assert done["status"]["phase"] == "Succeeded"
    child = int(lc_kubectl_one("logs", "p", namespace=ns).stdout.split()[0])

    def gone() -> bool:
        try:
            return psutil.Process(child).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(gone, timeout=10, what="the container's leftover child to be killed")


def test_restart_policy_always_restarts_with_backoff(lc_api, ns, lc_kubectl_one):
    create_pod(
        lc_api,
        ns,
        {"containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", "echo run; exit 1"]}]},
    )

    def restarted():
        statuses = pod(lc_api, ns, "p")["status"].get("containerStatuses") or []
        return statuses and statuses[0]["restartCount"] >= 1 and statuses[0]

    status = wait_for(restarted, timeout=20, what="a restart")
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert lc_kubectl_one("logs", "p", "--previous", namespace=ns).stdout == "run\n"


def test_logs_tail_since_follow_and_timestamps(lc_api, ns, lc_kubectl_one):
    script = (
        "import time; print('line1'); print('line2', flush=True); time.sleep(2.5); "
        "print('line3', flush=True); time.sleep(1)"
    )
    create_pod(
        lc_api,
        ns,
        {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox", "command": [PY, "-c", script]}],
        },
    )
    wait_for(
        lambda: "line2" in lc_kubectl_one("logs", "p", namespace=ns, check=False).stdout, what="first lines"
    )
    assert lc_kubectl_one("logs", "p", "--tail=1", namespace=ns).stdout == "line2\n"
    followed = lc_kubectl_one("logs", "-f", "p", namespace=ns, timeout=20).stdout
    assert followed == "line1\nline2\nline3\n"
    assert lc_kubectl_one("logs", "p", "--since=2s", namespace=ns).stdout == "line3\n"
    stamped = lc_kubectl_one("logs", "p", "--timestamps", namespace=ns).stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in stamped] == ["line1", "line2", "line3"]
    assert all(line[:4].isdigit() and "T" in line.split(" ")[0] for line in stamped)


def test_memory_limit_is_enforced_as_oomkilled(lc_api, ns):
    script = (
        "import time; blob = bytearray(300 * 2**20); blob[::4096] = b'x' * len(blob[::4096]); time.sleep(10)"
    )
    create_pod(
        lc_api,
        ns,
        {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": [PY, "-c", script],
                    "resources": {"limits": {"memory": "100Mi"}},
                }
            ],
        },
    )
    done = wait_for(lambda: pod_phase(lc_api, ns, "p"), timeout=15, what="OOM kill")
    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137)
    assert done["status"]["phase"] == "Failed"


def test_failing_liveness_probe_restarts_the_container(lc_api, ns):
    create_pod(
        lc_api,
        ns,
        {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": [PY, "-c", "import time; time.sleep(60)"],
                    "livenessProbe": {
                        "exec": {"command": ["false"]},
                        "periodSeconds": 1,
                        "failureThreshold": 1,
                    },
                }
            ],
        },
    )

    def restarted():
        statuses = pod(lc_api, ns, "p")["status"].get("containerStatuses") or []
        return statuses and statuses[0]["restartCount"] >= 1 and statuses[0]

    status = wait_for(restarted, timeout=20, what="liveness restart")
    assert status["lastState"]["terminated"]["exitCode"] == 143
    messages = [e["message"] for e in events(lc_api, ns, "p")]
    assert "Container main failed liveness probe, will be restarted" in messages
    assert any(m.startswith("Liveness probe failed") for m in messages)


def test_native_sidecar_runs_beside_the_job_container_and_is_stopped_after_it(lc_api, ns, tmp_path):
    seen = tmp_path / "sidecar-saw"
    sidecar = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "pathlib.Path(sys.argv[1]).write_text('up')\n"
        "time.sleep(60)\n"
    )
    main = "import pathlib, sys; sys.exit(0 if pathlib.Path(sys.argv[1]).read_text() == 'up' else 5)"
    create_pod(
        lc_api,
        ns,
        {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "initContainers": [
                {
                    "name": "sidecar",
                    "image": "busybox",
                    "restartPolicy": "Always",
                    "command": [PY, "-c", sidecar],
                    "args": [str(seen)],
                    "startupProbe": {"exec": {"command": ["test", "-s", str(seen)]}, "periodSeconds": 1},
                }
            ],
            "containers": [
                {"name": "main", "image": "busybox", "command": [PY, "-c", main], "args": [str(seen)]}
            ],
        },
    )
    done = wait_for(lambda: pod_phase(lc_api, ns, "p"), timeout=20, what="pod to finish")
    assert done["status"]["phase"] == "Succeeded"
    assert done["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    side = wait_for(
        lambda: (
            (s := pod(lc_api, ns, "p")["status"]["initContainerStatuses"][0])["state"].get("terminated") and s
        ),
        timeout=10,
        what="sidecar stopped",
    )
    assert side["state"]["terminated"]["exitCode"] == 0


def test_pending_pod_is_scheduled_once_resources_free_up(lc_api, ns):
    def gpu_pod(name):
        create_pod(
            lc_api,
            ns,
            {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "nodeSelector": {"kubernetes.io/hostname": "gpu-node-0"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                "containers": [
                    {
                        "name": "main",
                        "image": "busybox",
                        "command": [PY, "-c", "import time; time.sleep(30)"],
                        "resources": {"limits": {"nvidia.com/gpu": "8"}},
                    }
                ],
            },
            name=name,
        )

    gpu_pod("first")
    wait_for(lambda: pod(lc_api, ns, "first")["status"].get("phase") == "Running", what="first running")
    gpu_pod("second")
    cond = wait_for(
        lambda: (c := condition(pod(lc_api, ns, "second"), "PodScheduled")) and c["status"] == "False" and c,
        what="second unschedulable",
    )
    assert cond["message"].startswith(
        "0/3 nodes are available: 1 Insufficient nvidia.com/gpu, 2 node(s) didn't "
        "match Pod's node affinity/selector."
    )
    client.CoreV1Api(lc_api).delete_namespaced_pod("first", ns)
    second = wait_for(
        lambda: (p := pod(lc_api, ns, "second"))["spec"].get("nodeName") and p,
        timeout=15,
        what="second scheduled after first is gone",
    )
    assert second["spec"]["nodeName"] == "gpu-node-0"
    assert condition(second, "PodScheduled")["status"] == "True"


IN_CLUSTER_CLIENT = """
import json, os
from kubernetes import client, config
from kubernetes.client.rest import ApiException
config.load_config()  # in a pod: the ServiceAccount the kubelet mounted
core = client.CoreV1Api()
namespace = os.environ['POD_NAMESPACE']
results = {}
for kind, call in (('configmaps', core.list_namespaced_config_map), ('secrets', core.list_namespaced_secret)):
    try:
        call(namespace)
        results[kind] = 200
    except ApiException as exc:
        results[kind] = [exc.status, json.loads(exc.body)['message']]
print(json.dumps(results))
"""


def test_pod_authenticates_as_its_service_account(lc_api, ns):
    """The kubelet mounts a bound ServiceAccount token at /var/run/secrets/kubernetes.io/serviceaccount; an
    in-cluster client in the pod is that account, with exactly its RBAC."""
    core = client.CoreV1Api(lc_api)
    rbac = client.RbacAuthorizationV1Api(lc_api)
    core.create_namespaced_service_account(ns, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(
        ns,
        {
            "metadata": {"name": "cm-reader"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}],
        },
    )
    create_pod(
        lc_api,
        ns,
        {
            "serviceAccountName": "reader",
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "c",
                    "image": "ghcr.io/finetune-operator/trainer:dev",
                    "command": ["python", "-c", IN_CLUSTER_CLIENT],
                    "env": [
                        {
                            "name": "POD_NAMESPACE",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                        }
                    ],
                }
            ],
        },
        name="in-cluster",
    )
    done = wait_for(lambda: pod_phase(lc_api, ns, "in-cluster"), timeout=60, what="the pod to finish")
    volumes = [v for v in done["spec"]["volumes"] if v["name"].startswith("kube-api-access-")]
    assert len(volumes) == 1 and "serviceAccountToken" in volumes[0]["projected"]["sources"][0]
    logs = core.read_namespaced_pod_log("in-cluster", ns)
    assert done["status"]["phase"] == "Succeeded", logs
    results = json.loads(logs.strip().splitlines()[-1])
    assert results["configmaps"] == 200
    assert results["secrets"] == [
        403,
        f'secrets is forbidden: User "system:serviceaccount:{ns}:reader" cannot list resource "secrets" '
        f'in API group "" in the namespace "{ns}"',
    ]


def test_pod_without_automount_gets_no_token(lc_api, ns):
    spec = {
        "automountServiceAccountToken": False,
        "restartPolicy": "Never",
        "containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", "env"]}],
    }
    create_pod(lc_api, ns, spec, name="no-token")
    done = wait_for(lambda: pod_phase(lc_api, ns, "no-token"), what="the pod to finish")
    assert not [v for v in done["spec"].get("volumes") or [] if v["name"].startswith("kube-api-access-")]
    assert "KUBECONFIG=" not in client.CoreV1Api(lc_api).read_namespaced_pod_log("no-token", ns)

"""Chaos benchmark: small CPU FineTuneJobs on the embedded cluster with the real operator, while, in one run,
the operator is killed (SIGKILL) at random moments, the API fails the operator's requests (500s, 429s, slow
answers) and drops every watch for a window, S3 answers 500/503 for a window (a fault-injecting proxy in front
of moto: the pods' Secret points at it), and one training pod is evicted.

    python benchmarks/bench_chaos.py [--jobs 20] [--kills 30] [--steps 4] [--deadline 900] [--seed 7]
    python benchmarks/bench_chaos.py --quick        # 3 jobs, 4 kills, short windows (the `make test` variant)

Counted at the end, from the API and S3 as they are (not from the operator's own account):
  completed       jobs Succeeded
  duplicates      child Jobs beyond one per (FineTuneJob, stage), by controller ownerReference
  lost_artifacts  artifacts in status.artifacts whose MANIFEST.json, or a file it lists, is missing from S3
  events_missing  phase transitions seen on the watch without exactly one Event for them (message "<Phase>: ";
                  the Unschedulable/ContainerConfigError/ChildConflict Warnings repeated while a phase lasts
                  are not transition Events)
  stuck           jobs not in a terminal phase at the deadline
  operator_restarts  restarts by the embedded cluster's supervisor (kills, and any crash the faults caused)

Last line: chaos: jobs=<n> completed=<n> duplicates=<n> lost_artifacts=<n> events_missing=<n> stuck=<n>
operator_restarts=<n>. Target: completed=jobs, every other count but operator_restarts 0.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localcluster.cluster import LocalCluster
from localcluster.kubelet.nodes import NodeConfig
from localcluster.s3 import S3FaultProxy

NAMESPACE = "chaos"
SECRET = "s3"
FTJ_PATH = f"/apis/finetune.dev/v1alpha1/namespaces/{NAMESPACE}/finetunejobs"
TERMINAL = ("Succeeded", "Failed", "Rejected")
OPERATOR_AGENTS = ("kopf", "finetune-operator")  # the operator's User-Agent products (Kopf's and its own)
# Warnings posted again while a phase lasts, whenever their message changes: not transition Events.
REPEATED_WARNINGS = frozenset({"Unschedulable", "ContainerConfigError", "ChildConflict"})


@dataclass
class Settings:
    jobs: int
    kills: int
    steps: int
    deadline: float
    seed: int
    kill_gap: tuple[float, float]
    api_window: tuple[float, float]  # seconds after the jobs are created
    s3_window: tuple[float, float]
    api_fault_rate: float = 0.1
    s3_fault_rate: float = 0.15


def settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(3, 4, 3, 240, args.seed, (4, 9), (3, 25), (8, 30))
    return Settings(args.jobs, args.kills, args.steps, args.deadline, args.seed, (3, 9), (10, 100), (30, 120))


# --- plain HTTP to the API (the benchmark's own requests are never faulted: faults target the operator) ---


class Api:
    def __init__(self, base: str) -> None:
        self.base = base

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "User-Agent": "bench-chaos/1"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def items(self, path: str) -> list[dict[str, Any]]:
        return list(self.request("GET", path).get("items") or [])


@dataclass
class PhaseLog:
    """Every phase each FineTuneJob goes through, from a watch that resumes after drops."""

    phases: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    current: dict[str, str] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def record(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        phase = (obj.get("status") or {}).get("phase")
        if phase and (not self.phases[name] or self.phases[name][-1] != phase):
            self.phases[name].append(phase)
        if phase:
            self.current[name] = phase

    def run(self, api: Api) -> None:
        version = ""
        while not self.stop.is_set():
            try:
                if not version:
                    listing = api.request("GET", FTJ_PATH)
                    for obj in listing.get("items") or []:
                        self.record(obj)
                    version = listing["metadata"]["resourceVersion"]
                url = f"{api.base}{FTJ_PATH}?watch=1&allowWatchBookmarks=true&resourceVersion={version}"
                request = urllib.request.Request(url, headers={"User-Agent": "bench-chaos/1"})
                with urllib.request.urlopen(request, timeout=30) as stream:
                    for line in stream:
                        if self.stop.is_set():
                            return
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            version = ""  # 410 Expired: list again
                            break
                        version = event["object"]["metadata"].get("resourceVersion", version)
                        if event["type"] != "BOOKMARK":
                            self.record(event["object"])
            except (OSError, ValueError, urllib.error.URLError):
                time.sleep(0.2)  # dropped or timed out: resume from `version`


def manifest(name: str, assets: dict[str, str], steps: int) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "baseModel": {"uri": assets["model"]},
            "dataset": {"train": assets["train"], "test": assets["test"]},
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
            "hyperparameters": {
                "epochs": 1,
                "maxSteps": steps,
                "batchSize": 4,
                "gradientAccumulationSteps": 1,
                "learningRate": 0.01,
                "maxSeqLength": 64,
                "gradientCheckpointing": False,
                "warmupRatio": 0.0,
                "seed": 11,
            },
            # One CPU per pod on a 3-CPU node: at most three pods at a time on this shared machine.
            "resources": {"gpus": 0, "gpuType": "cpu", "cpu": "1"},
            "storage": {"output": assets["output"], "credentialsSecret": SECRET},
            "evaluation": {"enabled": False},
            "deployment": {"enabled": False},
        },
    }


def upload_assets(cluster: LocalCluster) -> dict[str, str]:
    from finetune_demo.assets import upload_toy_assets

    return {**upload_toy_assets(cluster.s3_client()), "output": "s3://runs/chaos"}


# --- chaos ------------------------------------------------------------------------------------------------


class Chaos:
    def __init__(self, cluster: LocalCluster, api: Api, proxy: S3FaultProxy, cfg: Settings) -> None:
        self.cluster, self.api, self.proxy, self.cfg = cluster, api, proxy, cfg
        self.random = random.Random(cfg.seed)
        self.kills = 0
        self.evicted: str | None = None
        self.watch_drops = 0
        self._faults: list[Any] = []
        self._latency: Any = None
        self._api_on = False
        self._next_kill = 0.0
        self._next_drop = 0.0
        self._running_since: dict[str, float] = {}

    def tick(self, elapsed: float) -> None:
        self._api_window(elapsed)
        self._s3_window(elapsed)
        self._kill(elapsed)
        self._evict(elapsed)

    def _api_window(self, elapsed: float) -> None:
        start, end = self.cfg.api_window
        apiserver = self.cluster.apiserver
        assert apiserver is not None
        if start <= elapsed < end and not self._api_on:
            half = self.cfg.api_fault_rate / 2
            self._faults = [
                apiserver.add_fault("*", "*", 500, rate=half, agent=OPERATOR_AGENTS),
                apiserver.add_fault("*", "*", 429, rate=half, agent=OPERATOR_AGENTS),
            ]
            self._latency = apiserver.set_latency(1.5, rate=self.cfg.api_fault_rate, agent=OPERATOR_AGENTS)
            self._api_on = True
        if self._api_on and start <= elapsed < end and elapsed >= self._next_drop:
            self.watch_drops += self.cluster.call(_drop_watches(self.cluster))
            self._next_drop = elapsed + 5
        if self._api_on and elapsed >= end:
            for fault in self._faults:
                apiserver.remove_fault(fault)
            apiserver.remove_latency(self._latency)
            self._api_on = False

    def api_fault_hits(self) -> int:
        return sum(f.hits for f in self._faults) + (self._latency.hits if self._latency else 0)

    def _s3_window(self, elapsed: float) -> None:
        start, end = self.cfg.s3_window
        self.proxy.fail_rate = self.cfg.s3_fault_rate if start <= elapsed < end else 0.0

    def _kill(self, elapsed: float) -> None:
        if self.kills >= self.cfg.kills or elapsed < self._next_kill:
            return
        proc = self.cluster.operator_process
        if proc is None or proc.returncode is not None:
            return  # down (back-off): the next kill waits until it is back
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
            self.kills += 1
        self._next_kill = elapsed + self.random.uniform(*self.cfg.kill_gap)

    def _evict(self, elapsed: float) -> None:
        if self.evicted is not None:
            return
        pods = self.api.items(
            f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector=app.kubernetes.io/component%3Dtrain"
        )
        for pod in pods:
            name = pod["metadata"]["name"]
            if (pod.get("status") or {}).get("phase") != "Running":
                continue
            since = self._running_since.setdefault(name, elapsed)
            if elapsed - since < 3:  # let it start working first
                continue
            body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name}}
            with contextlib.suppress(urllib.error.HTTPError):
                self.api.request("POST", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}/eviction", body)
                self.evicted = name
                return

    def calm(self) -> None:
        apiserver = self.cluster.apiserver
        assert apiserver is not None
        for fault in self._faults:
            apiserver.remove_fault(fault)
        if self._latency is not None:
            apiserver.remove_latency(self._latency)
        self._api_on = False
        self.proxy.fail_rate = 0.0


async def _drop_watches(cluster: LocalCluster) -> int:
    assert cluster.apiserver is not None
    return cluster.apiserver.drop_watches()


# --- the counts -------------------------------------------------------------------------------------------


def count_duplicates(api: Api, uids: dict[str, str]) -> int:
    per_stage: collections.Counter[tuple[str, str]] = collections.Counter()
    for kind_path in ("/apis/batch/v1", "/apis/apps/v1"):
        resource = "jobs" if "batch" in kind_path else "deployments"
        for child in api.items(f"{kind_path}/namespaces/{NAMESPACE}/{resource}"):
            owners = [o for o in child["metadata"].get("ownerReferences") or [] if o.get("controller")]
            if owners and owners[0]["uid"] in uids.values():
                stage = (child["metadata"].get("labels") or {}).get("app.kubernetes.io/component", "?")
                per_stage[(owners[0]["uid"], f"{resource}/{stage}")] += 1
    return sum(n - 1 for n in per_stage.values() if n > 1)


def lost_artifacts(jobs: dict[str, dict[str, Any]]) -> tuple[int, list[str]]:
    """(artifacts checked, the lost ones): a committed directory must have its MANIFEST and every file."""
    from finetune_trainer import manifest, storage

    checked, lost = 0, []
    for name, obj in jobs.items():
        artifacts = (obj.get("status") or {}).get("artifacts") or {}
        for key, uri in artifacts.items():
            if key == "runPrefix" or not isinstance(uri, str) or not uri.startswith("s3://"):
                continue
            # `checkpoint` names the checkpoints directory: each committed step under it is an artifact.
            committed = (
                [
                    storage.join(uri, d)
                    for d in storage.list_dirs(uri)
                    if manifest.is_committed(storage.join(uri, d))
                ]
                if uri.rstrip("/").endswith("/checkpoints")
                else [uri]
            )
            for one in committed:
                checked += 1
                problem = _artifact_problem(one, manifest, storage)
                if problem:
                    lost.append(f"{name} {key} {one}: {problem}")
    return checked, lost


def _artifact_problem(uri: str, manifest: Any, storage: Any) -> str | None:
    try:
        if not uri.rstrip("/").rsplit("/", 1)[-1].count("."):
            found = manifest.read_manifest(uri.rstrip("/"))
            if found is None:
                return "no MANIFEST.json"
            for entry in found.files:
                if storage.stat(storage.join(uri, entry.path)).size != entry.size:
                    return f"{entry.path}: wrong size"
            return None
        return None if storage.exists(uri) else "missing"
    except (storage.NotFound, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def events_missing(api: Api, phases: dict[str, list[str]]) -> tuple[int, list[str]]:
    """(transitions, those without exactly one Event, described)."""
    events = [
        e
        for e in api.items(f"/api/v1/namespaces/{NAMESPACE}/events")
        if (e.get("involvedObject") or {}).get("kind") == "FineTuneJob"
    ]
    per: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for event in events:
        phase = str(event.get("message") or "").split(":", 1)[0]
        per[(event["involvedObject"]["name"], phase)].append(event)
    transitions, missing = 0, []
    for name, seen in phases.items():
        for phase in seen:
            transitions += 1
            found = per[(name, phase)]
            # A repeated Warning is not the transition's Event, unless it is the only one.
            transition = [e for e in found if e.get("reason") not in REPEATED_WARNINGS] or found
            if len(transition) != 1:
                detail = "; ".join(
                    f"{e['metadata']['name']} {e.get('reason')} at {e.get('firstTimestamp')}" for e in found
                )
                missing.append(f"{name} → {phase}: {len(found)} Events ({detail}); phases {seen}")
    return transitions, missing


# --- the run ----------------------------------------------------------------------------------------------


def run(cfg: Settings) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    cluster = LocalCluster(
        workdir,
        nodes=[NodeConfig(name="cpu-node-0", cpu="3", memory="64Gi")],
        backoff_scale=0.1,
        operator_restart_backoff=(0.5, 2.0),
    )
    cluster.start_background(timeout=120)
    proxy: S3FaultProxy | None = None
    phase_log = PhaseLog()
    try:
        assert cluster.s3_endpoint is not None
        proxy = S3FaultProxy(cluster.s3_endpoint, seed=cfg.seed)
        cluster.call(proxy.start())
        for key, value in cluster.s3_env.items():  # the benchmark's own checks go to S3 directly
            os.environ[key] = value
        api = Api(cluster.api_url)
        assets = upload_assets(cluster)
        api.request("POST", "/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})
        pod_env = {**cluster.s3_env, "AWS_ENDPOINT_URL": proxy.endpoint}  # the pods go through the proxy
        api.request(
            "POST",
            f"/api/v1/namespaces/{NAMESPACE}/secrets",
            {"metadata": {"name": SECRET}, "stringData": pod_env},
        )
        watcher = threading.Thread(target=phase_log.run, args=(api,), daemon=True)
        watcher.start()
        names = [f"chaos-{i:02d}" for i in range(cfg.jobs)]
        uids = {
            n: api.request("POST", FTJ_PATH, manifest(n, assets, cfg.steps))["metadata"]["uid"] for n in names
        }
        chaos = Chaos(cluster, api, proxy, cfg)
        began = time.monotonic()
        last_report = 0.0
        while (elapsed := time.monotonic() - began) < cfg.deadline:
            chaos.tick(elapsed)
            done = sum(1 for n in names if phase_log.current.get(n) in TERMINAL)
            if elapsed - last_report >= 30:
                print(
                    f"[{elapsed:5.0f}s] terminal {done}/{cfg.jobs}, kills {chaos.kills}, "
                    f"restarts {cluster.operator_restarts}, evicted {chaos.evicted or '-'}",
                    flush=True,
                )
                last_report = elapsed
            if done == cfg.jobs and chaos.kills >= cfg.kills and chaos.evicted is not None:
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - began
        chaos.calm()
        time.sleep(10)  # Events and status writes in flight settle (the operator retries what failed)
        objs = {o["metadata"]["name"]: o for o in api.items(FTJ_PATH)}
        for obj in objs.values():
            phase_log.record(obj)
        completed = sum(1 for o in objs.values() if (o.get("status") or {}).get("phase") == "Succeeded")
        stuck = sum(1 for n in names if (objs.get(n, {}).get("status") or {}).get("phase") not in TERMINAL)
        duplicates = count_duplicates(api, uids)
        checked, lost = lost_artifacts(objs)
        transitions, no_event = events_missing(api, dict(phase_log.phases))
        failed = {
            n: (o.get("status") or {}).get("message")
            for n, o in objs.items()
            if n in names and (o.get("status") or {}).get("phase") != "Succeeded"
        }
        print(
            f"chaos run: {elapsed:.0f}s, operator kills {chaos.kills}, "
            f"API faults hit {chaos.api_fault_hits()} "
            f"(+{chaos.watch_drops} watch streams dropped), S3 faults {dict(proxy.injected)} of "
            f"{proxy.forwarded + sum(proxy.injected.values())} requests, evicted {chaos.evicted or 'none'}, "
            f"{transitions} transitions, {checked} artifacts checked",
            flush=True,
        )
        for name, message in sorted(failed.items()):
            print(f"  not succeeded: {name}: {phase_log.phases.get(name)} {message}", flush=True)
        for problem in lost:
            print(f"  lost artifact: {problem}", flush=True)
        for problem in no_event:
            print(f"  transition without exactly one Event: {problem}", flush=True)
        return (
            f"chaos: jobs={cfg.jobs} completed={completed} duplicates={duplicates} "
            f"lost_artifacts={len(lost)} events_missing={len(no_event)} stuck={stuck} "
            f"operator_restarts={cluster.operator_restarts}"
        )
    finally:
        phase_log.stop.set()
        if proxy is not None:
            with contextlib.suppress(Exception):
                cluster.call(proxy.stop())
        cluster.stop_background()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=900, help="seconds after the jobs are created")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 jobs, 4 kills, short windows")
    line = run(settings(parser.parse_args(argv)))
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Operator benchmark: N FineTuneJobs applied in a burst to the embedded API (local kubelet off, so no pod
ever runs), the real operator in its own process.

Measures apply → validation-Job-created latency (p50/p99, from the API's watch stream), throughput, API
writes per job up to its first child (the emulator's counters, minus the benchmark's own writes), the
operator's RSS; then fails every validation Job (as the Job controller would), waits until all jobs are
terminal and counts the operator's writes over an idle minute.

    python benchmarks/bench_operator.py [--jobs 1000] [--idle-seconds 60]

Last line: p99_s=<x> jobs_per_s=<y> writes_per_job=<z> rss_mb=<w> idle_writes=<n>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "localcluster" / "src"))

from localcluster.cluster import LocalCluster  # noqa: E402

FTJ = "/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs"
NAMESPACE = "default"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def manifest(index: int) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"bench-{index:05d}", "namespace": NAMESPACE},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny"},
            "dataset": {"train": "s3://data/toy/train.jsonl"},
            "resources": {"gpus": 1, "gpuType": "a100-80gb"},
            "storage": {"output": "s3://runs/bench", "credentialsSecret": "s3-credentials"},
        },
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def watch_jobs(
    session: aiohttp.ClientSession, api: str, seen: dict[str, float], done: asyncio.Event, total: int
) -> None:
    """Record when each validation Job first appears (ADDED on the watch stream)."""
    async with session.get(
        f"{api}/apis/batch/v1/jobs", params={"watch": "1"}, timeout=aiohttp.ClientTimeout(total=None)
    ) as response:
        async for line in response.content:
            if not line.strip():
                continue
            event = json.loads(line)
            name = event["object"]["metadata"]["name"]
            if event["type"] == "ADDED" and name.endswith("-validate") and name not in seen:
                seen[name.removesuffix("-validate")] = time.monotonic()
                if len(seen) >= total:
                    done.set()
                    return


async def burst(session: aiohttp.ClientSession, api: str, count: int, created: dict[str, float]) -> None:
    semaphore = asyncio.Semaphore(64)

    async def one(index: int) -> None:
        body = manifest(index)
        async with semaphore, session.post(api + FTJ.format(ns=NAMESPACE), json=body) as response:
            assert response.status == 201, await response.text()
            created[body["metadata"]["name"]] = time.monotonic()

    await asyncio.gather(*(one(i) for i in range(count)))


async def fail_validation_jobs(session: aiohttp.ClientSession, api: str, names: list[str]) -> None:
    """What the Job controller does when validation fails for good: the Failed condition."""
    semaphore = asyncio.Semaphore(64)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {
        "status": {
            "failed": 1,
            "startTime": now,
            "conditions": [
                {
                    "type": "FailureTarget",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "bench",
                    "lastTransitionTime": now,
                    "lastProbeTime": now,
                },
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "bench",
                    "lastTransitionTime": now,
                    "lastProbeTime": now,
                },
            ],
        }
    }

    async def one(name: str) -> None:
        async with (
            semaphore,
            session.patch(
                f"{api}/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{name}-validate/status",
                json=status,
                headers={"Content-Type": "application/merge-patch+json"},
            ) as r,
        ):
            assert r.status == 200, await r.text()

    await asyncio.gather(*(one(n) for n in names))


async def count_phases(session: aiohttp.ClientSession, api: str, phases: tuple[str, ...]) -> int:
    async with session.get(api + FTJ.format(ns=NAMESPACE)) as response:
        items = (await response.json())["items"]
    return sum(1 for i in items if (i.get("status") or {}).get("phase") in phases)


async def run(args: argparse.Namespace) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    cluster = LocalCluster(workdir, kubelet=False, s3=False, operator=False, install_crds=True)
    await cluster.start()
    api = cluster.api_url
    liveness = free_port()
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PYTHONUNBUFFERED": "1"}
    log = open(workdir / "operator.log", "wb")  # noqa: SIM115
    operator = subprocess.Popen(
        [
            sys.executable,
            # BENCH_PROFILE=out.prof profiles the operator (written when it exits).
            *(
                ["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]]
                if os.environ.get("BENCH_PROFILE")
                else []
            ),
            "-m",
            "finetune_operator",
            "--all-namespaces",
            "--metrics-port",
            "0",
            "--liveness-port",
            str(liveness),
            "--log-level",
            os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    process = psutil.Process(operator.pid)
    peak_rss = 0
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{liveness}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline or operator.poll() is not None:
                    raise SystemExit(f"operator did not become live; see {workdir / 'operator.log'}")
                await asyncio.sleep(0.2)
            assert cluster.apiserver is not None
            counters = cluster.apiserver.counters
            counters.reset()

            created: dict[str, float] = {}
            seen: dict[str, float] = {}
            done = asyncio.Event()
            watcher = asyncio.create_task(watch_jobs(session, api, seen, done, args.jobs))
            await asyncio.sleep(0.2)
            began = time.monotonic()
            await burst(session, api, args.jobs, created)
            applied = time.monotonic()
            sampler_stop = asyncio.Event()

            async def sample() -> None:
                nonlocal peak_rss
                while not sampler_stop.is_set():
                    peak_rss = max(peak_rss, process.memory_info().rss)
                    await asyncio.sleep(0.25)

            sampler = asyncio.create_task(sample())
            await asyncio.wait_for(done.wait(), timeout=args.timeout)
            finished = time.monotonic()
            operator_cpu = sum(process.cpu_times()[:2])
            own_cpu = sum(psutil.Process().cpu_times()[:2])
            # The pass that creates a job's first child also patches its status and posts one Event.
            while await count_phases(session, api, ("Validating",)) < args.jobs:
                await asyncio.sleep(0.5)
            await asyncio.sleep(1)
            operator_writes = counters.total_writes() - args.jobs  # minus the benchmark's own creates
            latencies = [seen[name] - created[name] for name in created]
            writes_per_job = operator_writes / args.jobs
            print(
                f"applied {args.jobs} jobs in {applied - began:.2f}s; all validation Jobs created after "
                f"{finished - began:.2f}s"
            )
            print(
                f"CPU seconds: operator {operator_cpu:.1f}, API emulator + benchmark client {own_cpu:.1f} "
                f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
            )
            print(
                f"apply -> validation Job: p50 {statistics.median(latencies):.3f}s, "
                f"p99 {percentile(latencies, 0.99):.3f}s, max {max(latencies):.3f}s"
            )
            print(
                "writes up to the first child (the benchmark's FineTuneJob creates included):",
                json.dumps(counters.snapshot()["writes"]),
            )
            watcher.cancel()

            await fail_validation_jobs(session, api, sorted(created))
            deadline = time.monotonic() + args.timeout
            while (
                terminal := await count_phases(session, api, ("Failed", "Rejected", "Succeeded"))
            ) < args.jobs:
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {terminal}/{args.jobs} jobs terminal")
                await asyncio.sleep(1)
            await asyncio.sleep(2)  # let the last Events land
            counters.reset()
            await asyncio.sleep(args.idle_seconds)
            idle_writes = counters.total_writes()
            print(
                f"idle {args.idle_seconds:g}s with all jobs terminal: {idle_writes} writes",
                json.dumps(counters.snapshot()["writes"]),
            )
            sampler_stop.set()
            await sampler
            peak_rss = max(peak_rss, process.memory_info().rss)
    finally:
        operator.terminate()
        try:
            operator.wait(15)
        except subprocess.TimeoutExpired:
            operator.kill()
        log.close()
        await cluster.stop()
    jobs_per_s = args.jobs / (finished - began)
    return (
        f"p99_s={percentile(latencies, 0.99):.3f} jobs_per_s={jobs_per_s:.1f} "
        f"writes_per_job={writes_per_job:.2f} rss_mb={peak_rss / 2**20:.0f} idle_writes={idle_writes}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=60)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    print(asyncio.run(run(args)))


if __name__ == "__main__":
    main()

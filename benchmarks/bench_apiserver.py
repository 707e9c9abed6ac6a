"""API emulator benchmark: 1,000 custom resources created (schema + CEL admission) while 3 watchers stream.

Prints p50/p95/p99 request latency, throughput, watch delivery and the server process's peak RSS, against
the targets of issue 3 (p99 <= 50 ms, RSS <= 300 MB). The server runs in its own process so its RSS is
measured alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp
import psutil

GROUP, VERSION, PLURAL = "bench.example.com", "v1", "items"
CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "item", "kind": "Item"},
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [{"name": "Size", "type": "integer", "jsonPath": ".spec.size"}],
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "x-kubernetes-validations": [
                                    {"rule": "self.size <= 1000", "message": "too big"}
                                ],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1},
                                    "mode": {"type": "string", "enum": ["a", "b"], "default": "a"},
                                    "tags": {"type": "object", "additionalProperties": {"type": "string"}},
                                },
                            },
                            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        },
                    }
                },
            }
        ],
    },
}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def watch(
    session: aiohttp.ClientSession, url: str, expected: int, counts: list[int], index: int
) -> None:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as response:
        async for line in response.content:
            if not line.strip():
                continue
            if json.loads(line)["type"] == "ADDED":
                counts[index] += 1
                if counts[index] >= expected:
                    return


async def run(
    base: str, objects: int, concurrency: int, watchers: int, server: psutil.Process
) -> dict[str, Any]:
    peak_rss = server.memory_info().rss
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency + watchers + 4)
    ) as session:
        async with session.post(
            f"{base}/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=CRD
        ) as r:
            assert r.status == 201, await r.text()
        collection = f"{base}/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}"
        async with session.get(collection) as r:
            start_rv = (await r.json())["metadata"]["resourceVersion"]
        counts = [0] * watchers
        watch_url = f"{collection}?watch=true&allowWatchBookmarks=true&resourceVersion={start_rv}"
        watch_tasks = [
            asyncio.create_task(watch(session, watch_url, objects, counts, i)) for i in range(watchers)
        ]
        await asyncio.sleep(0.2)

        latencies: list[float] = []
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(objects):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                body = {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "Item",
                    "metadata": {"name": f"item-{i:05d}", "labels": {"batch": str(i % 10)}},
                    "spec": {"size": 1 + i % 900, "tags": {"owner": "bench", "index": str(i)}},
                }
                started = time.perf_counter()
                async with session.post(collection, json=body) as response:
                    await response.read()
                    if response.status != 201:
                        raise RuntimeError(f"create failed: {response.status}")
                latencies.append(time.perf_counter() - started)

        async def sample() -> None:
            nonlocal peak_rss
            while True:
                peak_rss = max(peak_rss, server.memory_info().rss)
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
        await asyncio.wait_for(asyncio.gather(*watch_tasks), timeout=30)
        delivered = time.perf_counter() - began
        list_started = time.perf_counter()
        async with session.get(
            collection, headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}
        ) as r:
            table = await r.json()
        list_ms = (time.perf_counter() - list_started) * 1000
        sampler.cancel()
        peak_rss = max(peak_rss, server.memory_info().rss)
    return {
        "objects": objects,
        "concurrency": concurrency,
        "watchers": watchers,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p95_ms": percentile(latencies, 0.95) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": max(latencies) * 1000,
        "creates_per_s": objects / elapsed,
        "all_watch_events_after_s": delivered,
        "watch_events": counts,
        "table_rows": len(table["rows"]),
        "table_list_ms": list_ms,
        "peak_rss_mb": peak_rss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--watchers", type=int, default=3)
    args = parser.parse_args()
    process = subprocess.Popen(
        [sys.executable, "-m", "localcluster.apiserver", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        base = process.stdout.readline().strip()
        result = asyncio.run(
            run(base, args.objects, args.concurrency, args.watchers, psutil.Process(process.pid))
        )
    finally:
        process.terminate()
        process.wait(10)
    load = os.getloadavg()[0]
    print(
        f"API emulator: {result['objects']} custom resources created by {result['concurrency']} concurrent "
        f"clients while {result['watchers']} watchers stream "
        f"(load average {load:.1f} on {os.cpu_count()} CPUs)"
    )
    print(
        f"  request latency  p50 {result['p50_ms']:.1f} ms  p95 {result['p95_ms']:.1f} ms  "
        f"p99 {result['p99_ms']:.1f} ms  max {result['max_ms']:.1f} ms   (target p99 <= 50 ms: "
        f"{'met' if result['p99_ms'] <= 50 else 'MISSED'})"
    )
    print(
        f"  throughput       {result['creates_per_s']:.0f} creates/s; every watcher had all events after "
        f"{result['all_watch_events_after_s']:.2f} s (events per watcher: {result['watch_events']})"
    )
    print(f"  table list       {result['table_rows']} rows in {result['table_list_ms']:.0f} ms")
    print(
        f"  server peak RSS  {result['peak_rss_mb']:.0f} MB   (target <= 300 MB: "
        f"{'met' if result['peak_rss_mb'] <= 300 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()

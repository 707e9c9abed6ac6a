"""Prometheus metrics: jobs by phase, stage durations, reconcile errors, GPU-hours, API writes, and the
FineTunePolicy budgets (GPU-hours used and remaining this month per policy and namespace)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

STAGE_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 259200)


class _JobsCollector(Collector):
    """Computed at scrape time from what the operator last saw of each job."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        by_phase = GaugeMetricFamily("finetune_jobs", "FineTuneJobs by phase", labels=["phase"])
        for phase, count in sorted(Tally(self.metrics.phases.values()).items()):
            by_phase.add_metric([phase], count)
        yield by_phase
        # Exposed as finetune_gpu_hours_total{namespace}: GPU-hours FineTuneJobs spent while this process ran
        # (increases only, like any counter; a deleted job's hours stay counted).
        hours = CounterMetricFamily(
            "finetune_gpu_hours", "GPU-hours spent by FineTuneJobs, by namespace", labels=["namespace"]
        )
        for namespace, value in sorted(self.metrics.gpu_hours_total.items()):
            hours.add_metric([namespace], value)
        yield hours
        used = GaugeMetricFamily(
            "finetune_policy_gpu_hours_used",
            "GPU-hours a namespace used this month (spent + running estimates), per FineTunePolicy",
            labels=["policy", "namespace"],
        )
        remaining = GaugeMetricFamily(
            "finetune_policy_gpu_hours_remaining",
            "GPU-hours left this month under a FineTunePolicy's gpuHoursPerMonth, per namespace",
            labels=["policy", "namespace"],
        )
        for (policy, namespace), (spent, budget) in sorted(self.metrics.budgets.items()):
            used.add_metric([policy, namespace], spent)
            if budget is not None:
                remaining.add_metric([policy, namespace], max(0.0, budget - spent))
        yield used
        yield remaining
        loaded = GaugeMetricFamily(
            "finetune_modelserver_loaded_adapters",
            "Adapter versions loaded per ModelServer pod, as its adapter router reports",
            labels=["namespace", "modelserver", "pod"],
        )
        for (namespace, server, pod), count in sorted(self.metrics.loaded_adapters.items()):
            loaded.add_metric([namespace, server, pod], count)
        yield loaded
        yield from self.versions()

    def versions(self) -> Iterator[Metric]:
        labels = ["namespace", "modelserver", "model", "version"]
        weight = GaugeMetricFamily(
            "finetune_modelserver_version_weight_percent", "Share of a stable name's requests", labels=labels
        )
        requests = GaugeMetricFamily(
            "finetune_modelserver_version_requests",
            "Requests a version answered since its stable name's weights last changed",
            labels=labels,
        )
        errors = GaugeMetricFamily(
            "finetune_modelserver_version_errors", "Errors of those requests", labels=labels
        )
        p95 = GaugeMetricFamily(
            "finetune_modelserver_version_p95_seconds", "p95 latency of those requests", labels=labels
        )
        for key, (share, count, failed, p95_ms) in sorted(self.metrics.versions.items()):
            weight.add_metric(list(key), share)
            requests.add_metric(list(key), count)
            errors.add_metric(list(key), failed)
            if p95_ms is not None:
                p95.add_metric(list(key), p95_ms / 1000)
        yield from (weight, requests, errors, p95)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.phases: dict[str, str] = {}  # job uid → phase
        self.gpu_hours: dict[tuple[str, str], float] = {}  # (namespace, uid) → GPU-hours
        self.gpu_hours_total: dict[str, float] = {}  # namespace → GPU-hours counted so far
        # (policy, namespace) → (GPU-hours used this month, gpuHoursPerMonth or None)
        self.budgets: dict[tuple[str, str], tuple[float, float | None]] = {}
        self.loaded_adapters: dict[tuple[str, str, str], int] = {}  # (namespace, modelserver, pod) → count
        # (namespace, modelserver, model, version) → (weight %, requests, errors, p95 ms or None) of every
        # routed version, as the pool's last pass merged its routers' stats (canary rollouts)
        self.versions: dict[tuple[str, str, str, str], tuple[int, int, int, float | None]] = {}
        self.adapter_load_seconds = Histogram(
            "finetune_modelserver_adapter_load_seconds",
            "Download and runtime load of one adapter version into one pod",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "finetune_stage_duration_seconds",
            "Wall time of finished stages",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "finetune_reconcile_errors", "Reconciles that raised", ["kind"], registry=self.registry
        )
        self.reconciles = Counter(
            "finetune_reconciles", "Reconciles run", ["trigger"], registry=self.registry
        )
        self.api_writes = Counter(
            "finetune_api_writes", "API writes by the operator", ["verb", "kind"], registry=self.registry
        )
        self.registry.register(_JobsCollector(self))

    def record_gpu_hours(self, namespace: str, uid: str, hours: float) -> None:
        """A job's status.gpuHours: the counter grows by what it added since last seen."""
        previous = self.gpu_hours.get((namespace, uid), 0.0)
        if hours > previous:
            self.gpu_hours_total[namespace] = self.gpu_hours_total.get(namespace, 0.0) + hours - previous
            self.gpu_hours[(namespace, uid)] = hours

    def forget(self, uid: str) -> None:
        self.phases.pop(uid, None)
        for key in [k for k in self.gpu_hours if k[1] == uid]:
            del self.gpu_hours[key]

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)

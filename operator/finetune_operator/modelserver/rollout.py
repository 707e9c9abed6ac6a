"""Canary rollouts of a stable model name (docs/serving.md, Canary rollouts). Pure, like planner.py.

A version whose serving check passed, on a model name with `spec.models[<name>].rollout` and a promoted
champion (no pin in force), does not take the name at once: it takes `steps[0]`% of the name's requests by
the routers' weights, then each next step once `stepSeconds` passed and it answered at least `minRequests`
within the limits, then 100% (promoted). The figures are the routers' `stats` (counted since the weights last
changed), merged over the ready replicas that hold the desired weights. Beyond `maxErrorRate` or
`maxLatencyIncrease` it is rolled back: the champion keeps the name and the version records why
(`rolloutFailed`), which its job reads (finetunejob/pooljob.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from finetune_vocabulary.capture import LATENCY_BUCKETS_MS, merge_buckets, percentile_ms

from finetune_operator.api.conditions import timestamp
from finetune_operator.api.modelserver import RolloutSpec
from finetune_operator.k8s.observe import parse_time

PROGRESSING = "Progressing"
COMPLETED = "Completed"
ROLLED_BACK = "RolledBack"


@dataclass(frozen=True)
class Figures:
    """One version's live figures, merged over replicas."""

    requests: int = 0
    errors: int = 0
    buckets: tuple[int, ...] = (0,) * (len(LATENCY_BUCKETS_MS) + 1)

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def p95_ms(self) -> float | None:
        return percentile_ms(self.buckets, 0.95)

    def as_status(self) -> dict[str, Any]:
        """status.models.<name>.rollout.challenger / championFigures."""
        found = {"requests": self.requests, "errors": self.errors}
        extra = {"errorRate": self.error_rate, "p95Ms": self.p95_ms}
        return {**found, **{k: v for k, v in extra.items() if v is not None}}

    def text(self) -> str:
        rate = f" ({self.error_rate:.1%})" if self.error_rate is not None else ""
        p95 = f", p95 {self.p95_ms:g} ms" if self.p95_ms is not None else ""
        return f"{self.requests} requests, {self.errors} errors{rate}{p95}"


def figures(
    replicas: Iterable[Mapping[str, Any]], model: str, weights: Mapping[str, int], name: str
) -> Figures:
    """`name`'s stats merged over the reported router states (ready replicas) whose weights for `model` are
    `weights` ({} : no weights, the route alone): a replica with other weights counts other traffic."""
    held = [r for r in replicas if dict((r.get("weights") or {}).get(model) or {}) == dict(weights)]
    stats = [((r.get("stats") or {}).get(name) or {}) for r in held]
    return Figures(
        requests=sum(int(s.get("requests") or 0) for s in stats),
        errors=sum(int(s.get("errors") or 0) for s in stats),
        buckets=tuple(merge_buckets(s.get("latencyBuckets") or [] for s in stats)),
    )


def start(
    challenger: Mapping[str, Any], champion: Mapping[str, Any], spec: RolloutSpec, now: str
) -> dict[str, Any]:
    """A new rollout at step 1 (status.models.<name>.rollout)."""
    rollout: dict[str, Any] = {
        "version": int(challenger["version"]),
        "name": str(challenger["name"]),
        "champion": int(champion["version"]),
        "championName": str(champion["name"]),
        "state": PROGRESSING,
        "step": 1,
        "steps": list(spec.steps),
        "weight": spec.steps[0],
        "stepStartedAt": now,
    }
    rollout["weights"] = weights_of(rollout)
    rollout["message"] = f"step 1/{len(spec.steps)}: {rollout['name']} takes {spec.steps[0]}%"
    return rollout


def weights_of(rollout: Mapping[str, Any]) -> dict[str, int]:
    """The routers' weights of a rollout in progress: champion and challenger, summing to 100."""
    weight = int(rollout["weight"])
    return {str(rollout["championName"]): 100 - weight, str(rollout["name"]): weight}


def started(rollout: Mapping[str, Any]) -> datetime:
    # written by this planner (api.conditions.timestamp); unreadable: the step is due
    return parse_time(rollout.get("stepStartedAt")) or datetime.min.replace(tzinfo=UTC)


def due_in(rollout: Mapping[str, Any], spec: RolloutSpec, now: datetime) -> float | None:
    """Seconds until the current step's stepSeconds are over (≥ 0), or None when no rollout progresses."""
    if rollout.get("state") != PROGRESSING:
        return None
    return max(0.0, spec.step_seconds - (now - started(rollout)).total_seconds())


@dataclass(frozen=True)
class Decision:
    rollout: dict[str, Any]  # the rollout's new status
    promote: bool = False  # the last step passed: the challenger takes the name
    failed: str | None = None  # rolled back: the message with the figures (the version's rolloutFailed)
    changed: bool = False  # state or step changed (the registry is written first)


def limits(spec: RolloutSpec) -> str:
    return (
        f"limits: error rate ≤ {spec.max_error_rate:.1%}, p95 ≤ champion +{spec.max_latency_increase:.0%}, "
        f"≥ {spec.min_requests} requests per step"
    )


def breach(spec: RolloutSpec, challenger: Figures, champion: Figures) -> str | None:
    """Why the challenger must be rolled back now, or None."""
    rate = challenger.errors / max(challenger.requests, spec.min_requests)
    if rate > spec.max_error_rate:
        return f"error rate {rate:.1%} > maxErrorRate {spec.max_error_rate:.1%}"
    mine, theirs = challenger.p95_ms, champion.p95_ms
    judged = challenger.requests >= spec.min_requests and mine is not None and theirs is not None
    if judged and mine is not None and theirs is not None and mine > theirs * (1 + spec.max_latency_increase):
        return (
            f"p95 latency {mine:g} ms > {theirs:g} ms of the champion + maxLatencyIncrease "
            f"{spec.max_latency_increase:.0%}"
        )
    return None


def decide(
    rollout: Mapping[str, Any], spec: RolloutSpec, challenger: Figures, champion: Figures, now: datetime
) -> Decision:
    """One pass of a Progressing rollout: roll back, advance a step, complete, or keep waiting."""
    new = {**rollout, "challenger": challenger.as_status(), "championFigures": champion.as_status()}
    step, steps = int(rollout["step"]), [int(s) for s in rollout["steps"]]
    where = f"step {step}/{len(steps)} ({rollout['weight']}%)"
    live = f"{rollout['name']}: {challenger.text()}; {rollout.get('championName')}: {champion.text()}"
    why = breach(spec, challenger, champion)
    if why is not None:
        message = f"{rollout['name']} rolled back at {where}: {why}; {live}; {limits(spec)}"
        new.update(state=ROLLED_BACK, weights={}, message=message)
        return Decision(new, failed=message, changed=True)
    elapsed = (now - started(rollout)).total_seconds()
    if elapsed < spec.step_seconds or challenger.requests < spec.min_requests:
        wait = (
            f"{spec.step_seconds - elapsed:.0f} s left"
            if elapsed < spec.step_seconds
            else f"waiting for {spec.min_requests} requests"
        )
        new["message"] = f"{where}, {wait}: {live}; {limits(spec)}"
        return Decision(new)
    if step >= len(steps):
        new.update(
            state=COMPLETED,
            weight=100,
            weights={},
            message=f"{rollout['name']} took 100% after {where}: {live}",
        )
        return Decision(new, promote=True, changed=True)
    new.update(step=step + 1, weight=steps[step], stepStartedAt=timestamp(now))
    new["weights"] = weights_of(new)
    new.update(challenger=None, championFigures=None)
    new["message"] = (
        f"step {step + 1}/{len(steps)}: {rollout['name']} takes {steps[step]}% (passed {where}: {live})"
    )
    return Decision(new, changed=True)


def end(rollout: Mapping[str, Any], why: str) -> Decision:
    """A rollout ended from outside (a pin, a version gone): RolledBack with `why`."""
    message = f"{rollout['name']} rolled back at step {rollout['step']}/{len(rollout['steps'])}: {why}"
    return Decision(
        {**rollout, "state": ROLLED_BACK, "weights": {}, "message": message}, failed=message, changed=True
    )


def state_weights(
    models: Mapping[str, Mapping[str, Any]], routes: Mapping[str, str], adapters: Mapping[str, str]
) -> dict[str, dict[str, int]]:
    """The state document's `weights`: stable names in a rollout whose two versions are loaded."""
    found = {
        name: weights_of(model["rollout"])
        for name, model in models.items()
        if (model.get("rollout") or {}).get("state") == PROGRESSING
    }
    return {m: w for m, w in found.items() if routes.get(m) in w and all(v in adapters for v in w)}


def version_gauges(
    reports: Iterable[Mapping[str, Any]], routes: Mapping[str, str], weights: Mapping[str, Mapping[str, int]]
) -> dict[tuple[str, str], tuple[int, int, int, float | None]]:
    """(model, versioned name) → (weight %, requests, errors, p95 ms) of every routed version."""
    held = list(reports)
    gauges: dict[tuple[str, str], tuple[int, int, int, float | None]] = {}
    for model, route in sorted(routes.items()):
        split = weights.get(model) or {}
        for name, weight in sorted((split or {route: 100}).items()):
            found = figures(held, model, split, name)
            gauges[(model, name)] = (weight, found.requests, found.errors, found.p95_ms)
    return gauges


def progress(
    model: str,
    current: Mapping[str, Any],
    versions: Mapping[int, Mapping[str, Any]],
    spec: RolloutSpec | None,
    pin: int | None,
    reports: Sequence[Mapping[str, Any]],
    now: datetime,
) -> Decision:
    """One pass of the rollout of `model` in progress; `versions` by number, `reports` of ready replicas."""
    if spec is None:  # no canary asked any more: promoted at once, as without one
        done = {**current, "state": COMPLETED, "weights": {}, "message": "rollout removed: promoted at once"}
        return Decision(done, promote=True, changed=True)
    if pin is not None:
        return end(current, f"pinned (spec.models.{model}.pin) during its canary")
    if current.get("version") not in versions or current.get("champion") not in versions:
        return end(current, "a version of the canary is gone")
    weights = weights_of(current)
    return decide(
        current,
        spec,
        figures(reports, model, weights, str(current["name"])),
        figures(reports, model, weights, str(current["championName"])),
        now,
    )

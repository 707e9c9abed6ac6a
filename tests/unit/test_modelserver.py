"""ModelServer (issue 11): the API (pydantic, CEL-equivalent checks on FineTuneJob.spec.deployment.server) and
the pure builders of the pool's Deployment, Service and ConfigMap."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from finetune_operator.api import crdgen
from finetune_operator.api.finetunejob import parse_spec
from finetune_operator.api.modelnames import parse_version, version_name
from finetune_operator.api.modelserver import parse_modelserver_spec
from finetune_operator.api.schema import SpecError
from finetune_operator.config import load_config
from finetune_operator.modelserver.builders import (
    ADMIN_PORT,
    ROUTER_PORT,
    PoolRef,
    desired_state,
    pool_deployment,
    pool_name,
    pool_network_policy,
    pool_service,
    state_configmap,
)

from .ftj_factory import spec as ftj_spec

CONFIG = load_config(env={})


def pool(**spec: Any) -> PoolRef:
    raw = {
        "baseModel": {"uri": "s3://models/tiny-llama"},
        "adapterSources": ["s3://runs"],
        "gpus": 0,
        "gpuType": "cpu",
        **spec,
    }
    return PoolRef("team-a", "shared", "pool-uid", parse_modelserver_spec(raw))


def containers(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in manifest["spec"]["template"]["spec"]["containers"]}


# --- the API ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("deployment", "method", "field", "words"),
    [
        ({"server": "shared"}, "lora", "spec.deployment.modelName", "set together"),
        ({"modelName": "bot"}, "lora", "spec.deployment.modelName", "set together"),
        ({"server": "shared", "modelName": "bot"}, "full", "spec.method", "no adapter"),
        (
            {"server": "shared", "modelName": "bot", "mode": "merged"},
            "lora",
            "spec.deployment.mode",
            "auto or",
        ),
        ({"server": "shared", "modelName": "bot-v2"}, "lora", "spec.deployment.modelName", "-v<digits>"),
        ({"server": "shared", "modelName": "base"}, "lora", "spec.deployment.modelName", "'base'"),
        ({"server": "shared", "modelName": "bot"}, "no-eval", "spec.evaluation.enabled", "not worse"),
    ],
)
def test_a_job_on_a_server_is_refused_naming_the_field(
    deployment: dict[str, Any], method: str, field: str, words: str
) -> None:
    raw = ftj_spec()
    raw["deployment"] = deployment
    raw["method"] = "lora" if method == "no-eval" else method
    if method == "no-eval":
        raw["evaluation"] = {**raw["evaluation"], "enabled": False}
    with pytest.raises(SpecError) as error:
        parse_spec(raw)
    assert field in str(error.value) and words in str(error.value)


def test_crd_carries_the_same_rules_as_cel() -> None:
    ftj = crdgen.build_crd(crdgen.FINETUNEJOB)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = {
        r["fieldPath"] for r in ftj["properties"]["spec"]["x-kubernetes-validations"] if "fieldPath" in r
    }
    assert {".deployment.modelName", ".method", ".deployment.mode", ".evaluation.enabled"} <= rules
    ms = crdgen.build_crd(crdgen.MODELSERVER)
    assert ms["spec"]["names"]["shortNames"] == ["ms"] and ms["spec"]["names"]["categories"] == ["finetune"]
    assert ms["spec"]["scope"] == "Namespaced"
    columns = [c["name"] for c in ms["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns[:3] == ["Base model", "Ready", "Models"]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"maxLoraRank": 12}, "maxLoraRank must be one of"),
        ({"models": {"bot-v1": {"pin": 1}}}, "-v<digits>"),
        ({"models": {"Bot": {"pin": 1}}}, "DNS labels"),
        ({"models": {"bot\n": {"pin": 1}}}, "DNS labels"),  # re.match with "$" admitted a final newline
        ({"extraArgs": ["--trust-remote-code"]}, "allow-listed"),
        ({"maxLoras": 0}, "maxLoras"),
        ({"adapterSources": []}, "spec.adapterSources"),
        ({"adapterSources": ["file:///etc"]}, "spec.adapterSources[0]"),
        ({"adapterSources": ["s3://runs/../secrets"]}, "spec.adapterSources[0]"),
        ({"adapterSources": None}, "spec.adapterSources"),
    ],
)
def test_bad_modelserver_specs_are_refused(spec: dict[str, Any], words: str) -> None:
    with pytest.raises(SpecError) as error:
        raw = {"baseModel": {"uri": "s3://models/tiny-llama"}, "adapterSources": ["s3://runs"], **spec}
        parse_modelserver_spec({k: v for k, v in raw.items() if v is not None})
    assert words in str(error.value)


def test_version_names_are_immutable_and_parse_back() -> None:
    assert version_name("bot", 3) == "bot-v3"
    assert parse_version("bot", "bot-v3") == 3
    assert parse_version("bot", "bot-v3x") is None and parse_version("bo", "bot-v3") is None
    assert parse_version("bot", "bot-v\u00b2") is None  # a digit to str.isdigit, not to int()


# --- builders --------------------------------------------------------------------------------------------


def test_the_pool_runs_vllm_with_runtime_lora_on_loopback_behind_the_router() -> None:
    manifest = pool_deployment(pool(replicas=2, maxLoras=6, maxLoraRank=16, maxModelLen=512), CONFIG)
    assert manifest["spec"]["replicas"] == 2
    vllm, router = containers(manifest)["vllm"], containers(manifest)["adapter-router"]
    args = vllm["args"]
    assert args[args.index("--host") + 1] == "127.0.0.1"  # only the router reaches vLLM
    assert "--enable-lora" in args and args[args.index("--max-lora-rank") + 1] == "16"
    assert args[args.index("--max-cpu-loras") + 1] == "6" and args[args.index("--max-loras") + 1] == "4"
    assert args[args.index("--served-model-name") + 1] == "base"
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in vllm["env"]
    assert "readinessProbe" not in vllm  # readiness is the router's: every adapter loaded
    assert router["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "admin"}
    assert {p["containerPort"] for p in router["ports"]} == {ROUTER_PORT, ADMIN_PORT}
    assert router["command"][-1] == "finetune_trainer.adapter_router"
    assert "envFrom" not in router  # no credentialsSecret, no Secret reference
    volumes = {v["name"]: v for v in manifest["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"] == {"name": "state", "configMap": {"name": "shared-pool"}}
    init = manifest["spec"]["template"]["spec"]["initContainers"]
    assert [c["args"][:2] for c in init] == [["fetch", "s3://models/tiny-llama"]]


def test_the_pool_pods_are_restricted_and_credentials_go_by_reference() -> None:
    manifest = pool_deployment(pool(credentialsSecret="s3-creds"), CONFIG)
    pod = manifest["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod["initContainers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert containers(manifest)["adapter-router"]["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert "envFrom" not in containers(manifest)["vllm"]  # s3 base model: fetched by the init container


def test_the_service_exposes_only_the_router() -> None:
    service = pool_service(pool(), CONFIG)
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["metadata"]["ownerReferences"][0]["kind"] == "ModelServer"
    assert service["metadata"]["ownerReferences"][0]["controller"] is True


def test_pins_do_not_roll_the_deployment_but_the_spec_does() -> None:
    plain = pool_deployment(pool(), CONFIG)["metadata"]["annotations"]
    pinned = pool_deployment(pool(models={"bot": {"pin": 1}}), CONFIG)["metadata"]["annotations"]
    bigger = pool_deployment(pool(maxLoras=16), CONFIG)["metadata"]["annotations"]
    assert plain == pinned and plain != bigger


def test_the_configmap_holds_the_desired_state() -> None:
    state = desired_state(
        {"bot-v2": "s3://runs/b/adapter", "bot-v1": "s3://runs/a/adapter"}, {"bot": "bot-v2"}
    )
    data = json.loads(state_configmap(pool(), state)["data"]["state.json"])
    assert data == {
        "adapters": {"bot-v1": "s3://runs/a/adapter", "bot-v2": "s3://runs/b/adapter"},
        "routes": {"bot": "bot-v2"},
    }


def test_pool_names_are_labels_and_collision_safe() -> None:
    assert pool_name("shared") == "shared-pool"
    long_a, long_b = "a" * 60, "a" * 61
    assert len(pool_name(long_a)) <= 63 and pool_name(long_a) != pool_name(long_b)
    assert pool_name("9.pools") != pool_name("9-pools")


# --- the admin port: NetworkPolicy and adapter sources -----------------------------------------------------


def identity_config() -> Any:
    env = {"FTO_OPERATOR_NAMESPACE": "finetune-system"}
    return load_config(env=env).model_copy(
        update={
            "operator": load_config(env=env).operator.model_copy(
                update={"pod_labels": {"app.kubernetes.io/name": "finetune-operator"}}
            )
        }
    )


def test_the_network_policy_admits_the_admin_port_only_from_the_operators_pods() -> None:
    config = identity_config()
    server = pool()
    policy = pool_network_policy(server, config)
    kubernetes_validate.validate(policy, "1.32", strict=True)
    assert policy["metadata"]["name"] == pool_name("shared")
    owner = policy["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "ModelServer" and owner["uid"] == "pool-uid" and owner["controller"] is True
    # It selects exactly the Deployment's pods, and is an Ingress policy (so unlisted ports are closed).
    deployment = pool_deployment(server, config)
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    public, admin = policy["spec"]["ingress"]
    assert public == {"ports": [{"protocol": "TCP", "port": ROUTER_PORT}]}  # from anywhere, as the Service
    assert admin["ports"] == [{"protocol": "TCP", "port": ADMIN_PORT}]
    assert admin["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "finetune-system"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "finetune-operator"}},
        }
    ]  # one peer with both selectors: the operator's pods in its namespace, not either alone


def test_without_an_operator_identity_no_pod_may_reach_the_admin_port() -> None:
    policy = pool_network_policy(pool(), CONFIG)
    kubernetes_validate.validate(policy, "1.32", strict=True)
    ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert ports == [ROUTER_PORT] and all("from" not in rule for rule in policy["spec"]["ingress"])


def test_the_router_is_told_its_adapter_sources_when_the_pod_is_built() -> None:
    server = pool(adapterSources=["s3://runs/team-a", "s3://shared/adapters/"])
    args = containers(pool_deployment(server, CONFIG))["adapter-router"]["args"]
    pairs = [args[i + 1] for i, a in enumerate(args) if a == "--adapter-source"]
    assert pairs == ["s3://runs/team-a", "s3://shared/adapters/"]
    assert server.spec.adapter_source_of("s3://runs/team-a/x/adapter") == "s3://runs/team-a"
    assert server.spec.adapter_source_of("s3://runs/team-ab/x") is None  # a path boundary, not a prefix


# --- capture and canary rollout (issue 24) -----------------------------------------------------------------

CAPTURE_AND_ROLLOUT_REFUSALS = [
    ({"capture": {"destination": "s3://elsewhere/capture"}}, "spec.capture.destination", "must lie under"),
    # a path boundary: s3://runs does not admit s3://runs-x
    ({"capture": {"destination": "s3://runs-x/capture"}}, "spec.capture.destination", "must lie under"),
    (
        {"models": {"bot": {"rollout": {"steps": [50, 10]}}}},
        "spec.models.bot.rollout.steps",
        "strictly increasing",
    ),
    (
        {"models": {"bot": {"rollout": {"steps": [10, 10]}}}},
        "spec.models.bot.rollout.steps",
        "strictly increasing",
    ),
    ({"models": {"bot": {"rollout": {"steps": [100]}}}}, "spec.models.bot.rollout.steps[0]", "99"),
    ({"models": {"bot": {"rollout": {"steps": [10], "stepSeconds": 0}}}}, "stepSeconds", "1"),
    ({"capture": {"destination": "s3://runs/c", "sampleRate": 1.5}}, "spec.capture.sampleRate", "1"),
    ({"capture": {"destination": "s3://runs/c", "redact": ["ssn"]}}, "spec.capture.redact[0]", "email"),
]


@pytest.mark.parametrize(("spec", "field", "words"), CAPTURE_AND_ROLLOUT_REFUSALS)
def test_capture_and_rollout_mistakes_are_refused_naming_the_field(
    spec: dict[str, Any], field: str, words: str
) -> None:
    raw = {"baseModel": {"uri": "s3://models/tiny-llama"}, "adapterSources": ["s3://runs"], **spec}
    with pytest.raises(SpecError) as error:
        parse_modelserver_spec(raw)
    assert field in str(error.value) and words in str(error.value)


def _admit(spec: dict[str, Any]) -> list[str]:
    from localcluster.crdvalidation import CRDValidator

    validator = CRDValidator(crdgen.build_crd(crdgen.MODELSERVER), "v1alpha1")
    obj = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": "shared", "namespace": "team-a"},
        "spec": {"baseModel": {"uri": "s3://models/tiny-llama"}, "adapterSources": ["s3://runs"], **spec},
    }
    return [f"{c.field}: {c.message}" for c in validator.validate(validator.normalize(obj))]


@pytest.mark.parametrize(("spec", "field", "words"), CAPTURE_AND_ROLLOUT_REFUSALS[:4])
def test_the_api_server_refuses_the_same_with_the_same_message(
    spec: dict[str, Any], field: str, words: str
) -> None:
    causes = _admit(spec)
    assert any(field in c and words in c for c in causes), causes


def test_capture_may_go_to_a_capture_destination_and_a_rollout_has_defaults() -> None:
    spec = {
        "captureDestinations": ["s3://capture/team-a"],
        "capture": {"destination": "s3://capture/team-a/support"},
        "models": {"bot": {"rollout": {"steps": [10, 50]}}},
    }
    assert _admit(spec) == []
    parsed = parse_modelserver_spec(
        {"baseModel": {"uri": "s3://models/tiny-llama"}, "adapterSources": ["s3://runs"], **spec}
    )
    assert parsed.capture is not None and parsed.capture.redact == ["email", "phone", "creditCard"]
    assert parsed.capture.sample_rate == 0.1 and parsed.capture.flush_seconds == 60
    rollout = parsed.rollout("bot")
    assert rollout is not None and (rollout.step_seconds, rollout.min_requests) == (300, 20)
    assert parsed.rollout("other") is None


def test_the_redactor_names_are_the_vocabularys() -> None:
    from typing import get_args

    from finetune_operator.api.modelserver import Redactor
    from finetune_vocabulary.capture import REDACTOR_NAMES

    assert get_args(Redactor) == REDACTOR_NAMES


def test_the_router_may_capture_only_under_the_pools_sources_and_knows_its_pod_name() -> None:
    server = pool(adapterSources=["s3://runs/team-a"], captureDestinations=["s3://capture/team-a"])
    router = containers(pool_deployment(server, CONFIG))["adapter-router"]
    args = router["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--capture-destination"] == [
        "s3://runs/team-a",
        "s3://capture/team-a",
    ]
    assert "--fault-injection" not in args  # chaos testing is off unless the operator config says so
    env = {e["name"]: e for e in router["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_fault_injection_follows_the_operator_config() -> None:
    chaos = load_config(env={"FTO_ROUTER_FAULT_INJECTION": "true"})
    assert chaos.router.fault_injection and not CONFIG.router.fault_injection
    args = containers(pool_deployment(pool(), chaos))["adapter-router"]["args"]
    assert "--fault-injection" in args


def test_the_state_carries_capture_under_the_pools_own_prefix_only_when_on() -> None:
    from finetune_operator.modelserver.builders import capture_state

    assert capture_state(pool()) is None
    assert "capture" not in desired_state({"bot-v1": "s3://runs/a"}, {"bot": "bot-v1"}, None, None)
    server = pool(capture={"destination": "s3://runs/capture/", "sampleRate": 0.5, "redact": ["email"]})
    assert capture_state(server) == {
        "prefix": "s3://runs/capture/team-a/shared",
        "sampleRate": 0.5,
        "redact": ["email"],
        "flushSeconds": 60,
    }
    state = desired_state(
        {"bot-v1": "s3://runs/a", "bot-v2": "s3://runs/b"},
        {"bot": "bot-v1"},
        {"bot": {"bot-v2": 10, "bot-v1": 90}},
        capture_state(server),
    )
    assert state["weights"] == {"bot": {"bot-v1": 90, "bot-v2": 10}}
    assert state["capture"]["prefix"] == "s3://runs/capture/team-a/shared"

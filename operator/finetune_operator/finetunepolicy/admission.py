"""The chart's ValidatingAdmissionPolicy for FineTunePolicy: generated here, written by `make crds` to
charts/finetune-operator/templates/policy-admission.yaml (a test fails when it is stale).

One policy (paramKind FineTunePolicy) and one binding whose paramRef selects every FineTunePolicy
(`selector: {}`, parameterNotFoundAction Allow: no policy, no restriction). kube-apiserver evaluates the
policy once per FineTunePolicy, and a request is denied when any of them denies it.

A binding's matchResources.namespaceSelector is one selector for the binding, so it cannot carry each
FineTunePolicy's own spec.namespaceSelector. Instead a matchCondition evaluates the param's selector
(matchLabels and matchExpressions with In/NotIn/Exists/DoesNotExist) against `namespaceObject`'s labels:
a FineTunePolicy whose selector does not select the job's namespace is skipped for that request.

The rules are the operator's static rules (policy.violations), worded the same:
`denied by FineTunePolicy <name>: spec.baseModel.uri hf://x/y is not in allowedBaseModels`.
CEL cost stays bounded: every list iterated is a FineTunePolicy list with maxItems (api/finetunepolicy.py),
URI globs are prefix matches (`startsWith`, no regex built from data), namespace labels are looked up by key,
never iterated.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from finetune_vocabulary.evaluation import MAX_GRADERS
from finetune_vocabulary.objectives import DEFAULT_OBJECTIVE

from finetune_operator.api import finetunepolicy as policy_models
from finetune_operator.api.finetunejob import API_VERSION, GROUP, PLURAL
from finetune_operator.api.modelserver import PLURAL as MODELSERVERS
from finetune_operator.finetunepolicy.enforcement import API_DEFAULT_GPU_TYPE, CPU_GPU_TYPE

TEMPLATE = "policy-admission.yaml"
P = "params.spec"
NS_LABELS = "namespaceObject.metadata.labels"
HAS_LABELS = "has(namespaceObject.metadata.labels)"


def _glob(patterns: str, uri: str) -> str:
    """`uri` matches one of the patterns: exact, or the prefix before a trailing `*` (policy_models)."""
    return (
        f"{patterns}.exists(g, g.endsWith('*') ? {uri}.startsWith(g.substring(0, size(g) - 1)) : {uri} == g)"
    )


def _denied(text: str) -> str:
    return f"'denied by FineTunePolicy ' + params.metadata.name + ': ' + {text}"


def _uri_rule(field: str, uri: str, allowed: str, optional: bool = False) -> dict[str, str]:
    present = f"!has({uri}) || " if optional else ""
    return {
        "expression": f"!has({P}.{allowed}) || {present}{_glob(f'{P}.{allowed}', uri)}",
        "messageExpression": _denied(f"'{field} ' + {uri} + ' is not in {allowed}'"),
        "reason": "Forbidden",
    }


def _selects_namespace() -> str:
    """The param's namespaceSelector against the request namespace's labels."""
    selector = f"{P}.namespaceSelector"
    labels = (
        f"!has({selector}.matchLabels) || {selector}.matchLabels.all(k, {HAS_LABELS} && k in {NS_LABELS} "
        f"&& {NS_LABELS}[k] == {selector}.matchLabels[k])"
    )
    present = f"({HAS_LABELS} && e.key in {NS_LABELS})"
    listed = f"(has(e.values) && {NS_LABELS}[e.key] in e.values)"
    expressions = (
        f"!has({selector}.matchExpressions) || {selector}.matchExpressions.all(e, "
        f"e.operator == 'In' ? ({present} && {listed}) : "
        f"e.operator == 'NotIn' ? (!{present} || !{listed}) : "
        f"e.operator == 'Exists' ? {present} : !{present})"
    )
    return f"!has({selector}) || (({labels}) && ({expressions}))"


SPEC = "object.spec"


def validations() -> list[dict[str, str]]:
    """The FineTuneJob rules, in policy.violations' order."""
    return _data_rules() + _training_rules() + _evaluation_rules()


def _data_rules() -> list[dict[str, str]]:
    """allowedBaseModels, allowedDatasets, allowedOutputs."""
    spec = SPEC
    return [
        _uri_rule("spec.baseModel.uri", f"{spec}.baseModel.uri", "allowedBaseModels"),
        _uri_rule("spec.dataset.train", f"{spec}.dataset.train", "allowedDatasets"),
        _uri_rule("spec.dataset.validation", f"{spec}.dataset.validation", "allowedDatasets", optional=True),
        _uri_rule("spec.dataset.test", f"{spec}.dataset.test", "allowedDatasets", optional=True),
        _uri_rule("spec.storage.output", f"{spec}.storage.output", "allowedOutputs"),
    ]


def _training_rules() -> list[dict[str, str]]:
    """allowedGpuTypes, maxGpusPerJob, allowedMethods, allowedObjectives, maxLoraRank."""
    spec = SPEC
    resources = f"{spec}.resources"
    nodes = f"(has({resources}.nodes) ? {resources}.nodes : 1)"
    objective = f"(has({spec}.objective) ? {spec}.objective : '{DEFAULT_OBJECTIVE}')"  # stored before it
    return [
        {
            "expression": f"!has({P}.allowedGpuTypes) || {resources}.gpus == 0 || "
            f"{resources}.gpuType in {P}.allowedGpuTypes || ({resources}.gpuType == '{API_DEFAULT_GPU_TYPE}' "
            f"&& has({P}.defaults) && has({P}.defaults.gpuType))",
            "messageExpression": _denied(
                f"'spec.resources.gpuType ' + {resources}.gpuType + ' is not in allowedGpuTypes'"
            ),
            "reason": "Forbidden",
        },
        {
            "expression": f"!has({P}.maxGpusPerJob) || {resources}.gpus * {nodes} <= {P}.maxGpusPerJob",
            "messageExpression": _denied(
                f"'spec.resources.gpus ' + string({resources}.gpus) + ({nodes} > 1 ? "
                f"' x spec.resources.nodes ' + string({nodes}) + ' = ' + "
                f"string({resources}.gpus * {nodes}) + ' GPUs' : '') + "
                f"' is more than maxGpusPerJob ' + string({P}.maxGpusPerJob)"
            ),
            "reason": "Forbidden",
        },
        {
            "expression": f"!has({P}.allowedMethods) || {spec}.method in {P}.allowedMethods",
            "messageExpression": _denied(f"'spec.method ' + {spec}.method + ' is not in allowedMethods'"),
            "reason": "Forbidden",
        },
        {
            "expression": f"!has({P}.allowedObjectives) || {objective} in {P}.allowedObjectives",
            "messageExpression": _denied(f"'spec.objective ' + {objective} + ' is not in allowedObjectives'"),
            "reason": "Forbidden",
        },
        {
            "expression": f"!has({P}.maxLoraRank) || {spec}.method == 'full' || "
            f"{spec}.lora.rank <= {P}.maxLoraRank",
            "messageExpression": _denied(
                f"'spec.lora.rank ' + string({spec}.lora.rank) + ' is more than maxLoraRank ' + "
                f"string({P}.maxLoraRank)"
            ),
            "reason": "Forbidden",
        },
    ]


def _hosts(urls: str) -> str:
    """The hosts, lowercased, of a CEL list of URLs, as urlsplit(url).hostname (EgressURL:
    scheme://host[:port][/path], no userinfo). A chain of maps computes each step once; substring and indexOf,
    not split, whose parts CEL's cost estimate cannot bound."""
    return (
        f"{urls}.map(u, u.lowerAscii()).map(u, u.substring(u.indexOf('//') + 2) + '/')"
        ".map(r, r.substring(0, r.indexOf('/')) + ':').map(a, a.substring(0, a.indexOf(':')))"
    )


def _not_listed(url: str) -> str:
    """CEL: the host of `url` is not in allowedReferenceHosts (exact, or under a `*.suffix`)."""
    suffix = "(h.startsWith('*.') && x.endsWith(h.substring(1)))"
    return f"{_hosts(f'[{url}]')}.exists(x, !{P}.allowedReferenceHosts.exists(h, h == x || {suffix}))"


def _judge_url_rules(field: str, present: str, url: str) -> list[tuple[str, str]]:
    """allowReference and allowedReferenceHosts for one judge URL (`present`: CEL, it is set)."""
    return [
        (
            f"!has({P}.allowReference) || {P}.allowReference || !({present})",
            f"'{field} is not allowed (allowReference is false)'",
        ),
        (
            f"!has({P}.allowedReferenceHosts) || !({present}) || !{_not_listed(url)}",
            f"'{field} host ' + {_hosts(f'[{url}]')}[0] + ' is not in allowedReferenceHosts'",
        ),
    ]


def _judge_rules() -> list[dict[str, str]]:
    """allowReference and allowedReferenceHosts on every judge URL (graders and safety), and allowedDatasets
    on the safety and retention sets (policy evaluation.evaluation_violations). One rule per grader index:
    the message names the field, and each rule's CEL cost stays small."""
    evaluation = f"{SPEC}.evaluation"
    graders, safety = f"{evaluation}.graders", f"{evaluation}.safety"
    rules: list[tuple[str, str]] = []
    for i in range(MAX_GRADERS):
        grader = f"{graders}[{i}]"
        present = f"has({graders}) && size({graders}) > {i} && has({grader}.judge) && has({grader}.judge.url)"
        rules += _judge_url_rules(f"spec.evaluation.graders[{i}].judge.url", present, f"{grader}.judge.url")
    present = f"has({safety}) && has({safety}.judge.url)"
    rules += _judge_url_rules("spec.evaluation.safety.judge.url", present, f"{safety}.judge.url")
    for section, key in (("safety", "prompts"), ("retention", "dataset")):
        uri = f"{evaluation}.{section}.{key}"
        rules.append(
            (
                f"!has({P}.allowedDatasets) || !has({evaluation}.{section}) || "
                f"{_glob(f'{P}.allowedDatasets', uri)}",
                f"'spec.evaluation.{section}.{key} ' + {uri} + ' is not in allowedDatasets'",
            )
        )
    return [{"expression": e, "messageExpression": _denied(m), "reason": "Forbidden"} for e, m in rules]


def _evaluation_rules() -> list[dict[str, str]]:
    """allowReference, allowedReferenceHosts (reference, then judges), allowedDatasets of the evaluation
    sets, requireThresholds."""
    evaluation = f"{SPEC}.evaluation"
    reference = f"{evaluation}.reference"
    return [
        {
            "expression": f"!has({reference}) || !has({P}.allowReference) || {P}.allowReference",
            "messageExpression": _denied(
                "'spec.evaluation.reference is not allowed (allowReference is false)'"
            ),
            "reason": "Forbidden",
        },
        {
            "expression": f"!has({reference}) || !has({P}.allowedReferenceHosts) || "
            f"{P}.allowedReferenceHosts.exists(h, h == variables.referenceHost || "
            "(h.startsWith('*.') && variables.referenceHost.endsWith(h.substring(1))))",
            "messageExpression": _denied(
                "'spec.evaluation.reference.url host ' + variables.referenceHost + "
                "' is not in allowedReferenceHosts'"
            ),
            "reason": "Forbidden",
        },
        *_judge_rules(),
        {
            "expression": f"!has({P}.requireThresholds) || !{P}.requireThresholds || "
            f"((!has({evaluation}.enabled) || {evaluation}.enabled) && has({evaluation}.thresholds) && "
            f"size({evaluation}.thresholds) > 0)",
            "messageExpression": _denied(
                "'spec.evaluation.thresholds must gate on at least one metric (requireThresholds)'"
            ),
            "reason": "Forbidden",
        },
    ]


def _serving_rules(prefix: str, type_field: str, default_exempt: str) -> list[dict[str, str]]:
    """allowedGpuTypes and maxServingGpus for one serving object (policy.serving_violations), on the
    variables servingType and servingGpus; `prefix` is the object's spec path of replicas and gpus."""
    field = prefix.removesuffix(".")
    spec = f"object.{field}"
    exempt = f" || ({default_exempt})" if default_exempt else ""
    return [
        {
            "expression": f"!has({P}.allowedGpuTypes) || variables.servingGpus == 0 || "
            f"variables.servingType in {P}.allowedGpuTypes{exempt}",
            "messageExpression": _denied(
                f"{type_field} + variables.servingType + ' is not in allowedGpuTypes'"
            ),
            "reason": "Forbidden",
        },
        {
            "expression": f"!has({P}.maxServingGpus) || variables.servingGpus <= {P}.maxServingGpus",
            "messageExpression": _denied(
                f"'{field}.replicas ' + string({spec}.replicas) + ' x {field}.gpus ' + "
                "string(variables.perReplica) + "
                f"' = ' + string(variables.servingGpus) + ' GPUs is more than maxServingGpus ' + "
                f"string({P}.maxServingGpus)"
            ),
            "reason": "Forbidden",
        },
    ]


def job_serving_rules() -> list[dict[str, str]]:
    """A job's own serving Deployment (policy.job_serving): its GPU type, or the training one."""
    deployment = "object.spec.deployment"
    type_field = f"(has({deployment}.gpuType) ? 'spec.deployment.gpuType ' : 'spec.resources.gpuType ')"
    exempt = (
        f"!has({deployment}.gpuType) && variables.servingType == '{API_DEFAULT_GPU_TYPE}' && "
        f"has({P}.defaults) && has({P}.defaults.gpuType)"
    )
    return _serving_rules("spec.deployment.", type_field, exempt)


def _match(plural: str) -> dict[str, Any]:
    rule = {
        "apiGroups": [GROUP],
        "apiVersions": ["*"],
        "operations": ["CREATE", "UPDATE"],
        "resources": [plural],
    }
    return {"resourceRules": [rule]}


def _serving_variables(replicas: str, gpus: str, gpu_type: str, serves: str = "") -> list[dict[str, str]]:
    """servingType, perReplica (gpus) and servingGpus: replicas x gpus, 0 on the CPU type or when `serves`
    is false."""
    condition = f"({serves}) && " if serves else ""
    return [
        {"name": "servingType", "expression": gpu_type},
        {"name": "perReplica", "expression": gpus},
        {
            "name": "servingGpus",
            "expression": f"{condition}variables.servingType != '{CPU_GPU_TYPE}' ? "
            f"{replicas} * variables.perReplica : 0",
        },
    ]


NOT_CANCELLED = "request.operation != 'UPDATE' || !has(object.spec.cancel) || !object.spec.cancel"


def policy_spec() -> dict[str, Any]:
    reference_url = "object.spec.evaluation.reference.url"
    deployment = "object.spec.deployment"
    return {
        "failurePolicy": "Fail",
        "paramKind": {"apiVersion": API_VERSION, "kind": policy_models.KIND},
        "matchConstraints": _match(PLURAL),
        "matchConditions": [
            {"name": "policy-selects-namespace", "expression": _selects_namespace()},
            # A cancelled job runs nothing again (planner: spec.cancel), so a policy tightened since it was
            # admitted must not refuse the cancel itself, nor later updates of it (labels, finalizers).
            {"name": "not-a-cancelled-job", "expression": NOT_CANCELLED},
        ],
        "variables": [
            {
                "name": "referenceHost",
                "expression": f"has(object.spec.evaluation.reference) ? "
                f"{reference_url}.split('/')[2].split(':')[0].lowerAscii() : ''",
            },
            *_serving_variables(
                f"{deployment}.replicas",
                # unset: sections.serving_gpus_default (0 when it follows a training run without GPUs)
                f"has({deployment}.gpus) ? {deployment}.gpus : "
                f"(!has({deployment}.gpuType) && object.spec.resources.gpus == 0 ? 0 : 1)",
                f"has({deployment}.gpuType) ? {deployment}.gpuType : object.spec.resources.gpuType",
                f"{deployment}.enabled && !has({deployment}.server)",
            ),
        ],
        "validations": validations() + job_serving_rules(),
    }


def server_policy_spec() -> dict[str, Any]:
    """ModelServers: allowedBaseModels, allowedGpuTypes and maxServingGpus (policy.server_violations)."""
    return {
        "failurePolicy": "Fail",
        "paramKind": {"apiVersion": API_VERSION, "kind": policy_models.KIND},
        "matchConstraints": _match(MODELSERVERS),
        "matchConditions": [{"name": "policy-selects-namespace", "expression": _selects_namespace()}],
        # unset gpus: 1 (0 on the cpu type, which servingGpus counts as 0 anyway; modelserver_models)
        "variables": _serving_variables(
            "object.spec.replicas", "has(object.spec.gpus) ? object.spec.gpus : 1", "object.spec.gpuType"
        ),
        "validations": [
            _uri_rule("spec.baseModel.uri", "object.spec.baseModel.uri", "allowedBaseModels"),
            *_serving_rules("spec.", "'spec.gpuType '", ""),
        ],
    }


def binding_spec(policy_name: str) -> dict[str, Any]:
    return {
        "policyName": policy_name,
        "validationActions": ["Deny"],
        "paramRef": {"selector": {}, "parameterNotFoundAction": "Allow"},
    }


def _indent(document: dict[str, Any], spaces: int) -> str:
    text = yaml.safe_dump(document, sort_keys=False, width=100000)
    return "".join(" " * spaces + line if line.strip() else line for line in text.splitlines(keepends=True))


# (name suffix, spec) of each admission policy: FineTuneJobs, and ModelServers (serving).
def _policies() -> list[tuple[str, dict[str, Any]]]:
    return [("", policy_spec()), ("-modelservers", server_policy_spec())]


def render_template() -> str:
    """The chart template: the policies and their bindings, when `policyAdmission.enabled`."""
    labels = '    {{- include "finetune-operator.labels" . | nindent 4 }}\n'
    binding = _indent({k: v for k, v in binding_spec("").items() if k != "policyName"}, 2)
    documents = []
    for suffix, spec in _policies():
        name = f'{{{{ include "finetune-operator.fullname" . }}}}-finetunepolicy{suffix}'
        documents.append(
            "apiVersion: admissionregistration.k8s.io/v1\n"
            "kind: ValidatingAdmissionPolicy\n"
            f"metadata:\n  name: {name}\n  labels:\n{labels}"
            f"spec:\n{_indent(spec, 2)}"
            "---\n"
            "apiVersion: admissionregistration.k8s.io/v1\n"
            "kind: ValidatingAdmissionPolicyBinding\n"
            f"metadata:\n  name: {name}\n  labels:\n{labels}"
            f"spec:\n  policyName: {name}\n{binding}"
        )
    return (
        "# Generated by operator/finetune_operator/finetunepolicy/admission.py (`make crds`): do not edit.\n"
        "# FineTunePolicies enforced at admission (FineTuneJobs, and ModelServers): every\n"
        "# FineTunePolicy is a param; a policy's spec.namespaceSelector is checked by the\n"
        "# matchCondition against the namespace's labels.\n"
        "{{- if .Values.policyAdmission.enabled }}\n" + "---\n".join(documents) + "{{- end }}\n"
    )


def manifests(name: str = "finetune-operator-finetunepolicy") -> list[dict[str, Any]]:
    """The same policies and bindings as plain objects (tests, the embedded cluster)."""
    out: list[dict[str, Any]] = []
    for suffix, spec in _policies():
        meta = {"name": name + suffix}
        out += [
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicy",
                "metadata": meta,
                "spec": spec,
            },
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": meta,
                "spec": binding_spec(name + suffix),
            },
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: write the template into the chart's templates directory given."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "charts/finetune-operator/templates") / TEMPLATE
    path.write_text(render_template(), encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Typed Kubernetes manifests: TypedDicts for the subset of the Kubernetes OpenAPI (v1.35) we build.

Names and fields are the OpenAPI definitions' (io.k8s.api.core.v1.Container is `Container`), camelCase as
the API server reads them, so a builder's output is the request body itself and mypy (strict) checks every
key and value type a builder writes. Only the fields the operator sets are declared; a field missing here
is a field no builder may write until it is added, with its OpenAPI type. Quantities are strings.
"""

from __future__ import annotations

from typing import Any, Literal, Required, TypedDict

# ------------------------------------------------------------------------------------------- meta/v1


class OwnerReference(TypedDict):
    apiVersion: str
    kind: str
    name: str
    uid: str
    controller: bool
    blockOwnerDeletion: bool


class ObjectMeta(TypedDict, total=False):
    name: Required[str]
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str]
    ownerReferences: list[OwnerReference]


class LabelSelector(TypedDict, total=False):
    matchLabels: dict[str, str]


# ------------------------------------------------------------------------------------------- core/v1


class SecretKeySelector(TypedDict, total=False):
    name: Required[str]
    key: Required[str]
    optional: bool


class ObjectFieldSelector(TypedDict):
    fieldPath: str


class EnvVarSource(TypedDict, total=False):
    secretKeyRef: SecretKeySelector
    fieldRef: ObjectFieldSelector


class EnvVar(TypedDict, total=False):
    name: Required[str]
    value: str
    valueFrom: EnvVarSource


class SecretEnvSource(TypedDict, total=False):
    name: Required[str]
    optional: bool


class EnvFromSource(TypedDict, total=False):
    secretRef: SecretEnvSource
    prefix: str


class VolumeMount(TypedDict, total=False):
    name: Required[str]
    mountPath: Required[str]
    readOnly: bool
    subPath: str


class EmptyDirVolumeSource(TypedDict, total=False):
    medium: str
    sizeLimit: str


class PersistentVolumeClaimVolumeSource(TypedDict, total=False):
    claimName: Required[str]
    readOnly: bool


class ConfigMapVolumeSource(TypedDict, total=False):
    name: Required[str]
    optional: bool


class Volume(TypedDict, total=False):
    name: Required[str]
    emptyDir: EmptyDirVolumeSource
    persistentVolumeClaim: PersistentVolumeClaimVolumeSource
    configMap: ConfigMapVolumeSource


class ResourceRequirements(TypedDict, total=False):
    requests: dict[str, str]
    limits: dict[str, str]


class Capabilities(TypedDict, total=False):
    drop: list[str]


class SeccompProfile(TypedDict):
    type: Literal["RuntimeDefault", "Localhost", "Unconfined"]


class SecurityContext(TypedDict, total=False):
    allowPrivilegeEscalation: bool
    readOnlyRootFilesystem: bool
    runAsNonRoot: bool
    capabilities: Capabilities
    seccompProfile: SeccompProfile


class PodSecurityContext(TypedDict, total=False):
    runAsNonRoot: bool
    runAsUser: int
    runAsGroup: int
    fsGroup: int
    seccompProfile: SeccompProfile


class HTTPGetAction(TypedDict):
    path: str
    port: int | str


class Probe(TypedDict, total=False):
    httpGet: HTTPGetAction
    periodSeconds: int
    failureThreshold: int
    initialDelaySeconds: int
    timeoutSeconds: int


class ContainerPort(TypedDict, total=False):
    name: str
    containerPort: Required[int]
    protocol: Literal["TCP", "UDP", "SCTP"]


class Container(TypedDict, total=False):
    name: Required[str]
    image: Required[str]
    imagePullPolicy: str
    command: list[str]
    args: list[str]
    env: list[EnvVar]
    envFrom: list[EnvFromSource]
    ports: list[ContainerPort]
    resources: ResourceRequirements
    volumeMounts: list[VolumeMount]
    securityContext: SecurityContext
    terminationMessagePath: str
    terminationMessagePolicy: Literal["File", "FallbackToLogsOnError"]
    startupProbe: Probe
    readinessProbe: Probe
    livenessProbe: Probe


class Toleration(TypedDict, total=False):
    key: str
    operator: Literal["Exists", "Equal"]
    value: str
    effect: str
    tolerationSeconds: int


class PodSpec(TypedDict, total=False):
    containers: Required[list[Container]]
    initContainers: list[Container]
    volumes: list[Volume]
    securityContext: PodSecurityContext
    serviceAccountName: str
    automountServiceAccountToken: bool
    priorityClassName: str
    restartPolicy: Literal["Always", "OnFailure", "Never"]
    nodeSelector: dict[str, str]
    tolerations: list[Toleration]
    affinity: dict[str, Any]  # passed through from the user's spec, validated there
    subdomain: str
    hostname: str
    terminationGracePeriodSeconds: int


class PodTemplateMeta(TypedDict, total=False):
    labels: dict[str, str]
    annotations: dict[str, str]


class PodTemplateSpec(TypedDict, total=False):
    metadata: PodTemplateMeta
    spec: Required[PodSpec]


class ServicePort(TypedDict, total=False):
    name: str
    port: Required[int]
    targetPort: int | str
    protocol: Literal["TCP", "UDP", "SCTP"]


class ServiceSpec(TypedDict, total=False):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"]
    clusterIP: str
    selector: dict[str, str]
    ports: list[ServicePort]
    publishNotReadyAddresses: bool


class Service(TypedDict):
    apiVersion: Literal["v1"]
    kind: Literal["Service"]
    metadata: ObjectMeta
    spec: ServiceSpec


class ConfigMap(TypedDict):
    apiVersion: Literal["v1"]
    kind: Literal["ConfigMap"]
    metadata: ObjectMeta
    data: dict[str, str]


# ------------------------------------------------------------------------------------------- batch/v1


class PodFailurePolicyOnExitCodesRequirement(TypedDict, total=False):
    containerName: str
    operator: Required[Literal["In", "NotIn"]]
    values: Required[list[int]]


class PodFailurePolicyOnPodConditionsPattern(TypedDict):
    type: str
    status: Literal["True", "False", "Unknown"]


class PodFailurePolicyRule(TypedDict, total=False):
    action: Required[Literal["FailJob", "FailIndex", "Ignore", "Count"]]
    onExitCodes: PodFailurePolicyOnExitCodesRequirement
    onPodConditions: list[PodFailurePolicyOnPodConditionsPattern]


class PodFailurePolicy(TypedDict):
    rules: list[PodFailurePolicyRule]


class JobSpec(TypedDict, total=False):
    template: Required[PodTemplateSpec]
    backoffLimit: int
    backoffLimitPerIndex: int
    maxFailedIndexes: int
    completions: int
    parallelism: int
    completionMode: Literal["NonIndexed", "Indexed"]
    activeDeadlineSeconds: int
    suspend: bool
    podFailurePolicy: PodFailurePolicy
    podReplacementPolicy: Literal["TerminatingOrFailed", "Failed"]
    successPolicy: dict[str, Any]
    ttlSecondsAfterFinished: int


class Job(TypedDict):
    apiVersion: Literal["batch/v1"]
    kind: Literal["Job"]
    metadata: ObjectMeta
    spec: JobSpec


# -------------------------------------------------------------------------------------------- apps/v1


class RollingUpdateDeployment(TypedDict, total=False):
    maxSurge: int | str
    maxUnavailable: int | str


class DeploymentStrategy(TypedDict, total=False):
    type: Literal["RollingUpdate", "Recreate"]
    rollingUpdate: RollingUpdateDeployment


class DeploymentSpec(TypedDict, total=False):
    replicas: int
    selector: Required[LabelSelector]
    strategy: DeploymentStrategy
    template: Required[PodTemplateSpec]


class Deployment(TypedDict):
    apiVersion: Literal["apps/v1"]
    kind: Literal["Deployment"]
    metadata: ObjectMeta
    spec: DeploymentSpec


# --------------------------------------------------------------------------------- networking.k8s.io/v1


class NetworkPolicyPort(TypedDict, total=False):
    port: int | str
    protocol: Literal["TCP", "UDP", "SCTP"]


class NetworkPolicyPeer(TypedDict, total=False):
    podSelector: LabelSelector
    namespaceSelector: LabelSelector


class NetworkPolicySpec(TypedDict, total=False):
    podSelector: Required[LabelSelector]
    policyTypes: list[Literal["Ingress", "Egress"]]
    ingress: list[dict[str, Any]]  # "from" is a Python keyword: rules are built as plain mappings


class NetworkPolicy(TypedDict):
    apiVersion: Literal["networking.k8s.io/v1"]
    kind: Literal["NetworkPolicy"]
    metadata: ObjectMeta
    spec: NetworkPolicySpec


# ----------------------------------------------------------------------------------- our custom objects


class CustomObject(TypedDict):
    """A FineTuneJob, ModelServer or FineTunePolicy as sent to the API: its spec is the pydantic model's
    `model_dump(by_alias=True, exclude_none=True)`, validated by that model before it is built."""

    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: dict[str, Any]


Manifest = Job | Deployment | Service | ConfigMap | NetworkPolicy | CustomObject

{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix of every resource: <release>-<chart>, or the release alone when it contains the chart name. */}}
{{- define "finetune-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: finetune-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: repository@digest when a digest is set (immutable; the tag
is then ignored), otherwise repository:tag with the chart's appVersion as the default tag.
Usage: include "finetune-operator.imageRef" (list .Values.image .Chart.AppVersion)
*/}}
{{- define "finetune-operator.imageRef" -}}
{{- $image := index . 0 }}
{{- $defaultTag := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $defaultTag $image.tag) }}
{{- end }}
{{- end }}

{{- define "finetune-operator.configPath" -}}/etc/finetune-operator/config.yaml{{- end }}

{{/*
The operator's RBAC rules: exactly operator/finetune_operator/k8s/rbac.py RULES (tests/chart/test_chart_rbac.py
compares them), never anything on Secrets. Shared by the ClusterRole (cluster mode) and the per-namespace
Roles (namespaced mode). Kopf needs nothing more: the operator runs it standalone (no peering objects), with
resource scanning off (no CRD or namespace reads), without Kopf's own Events, finalizers or annotations.
*/}}
{{- define "finetune-operator.rules" -}}
# Kopf lists and watches FineTuneJobs; the operator writes their status. A FineTuneSchedule's runs are
# created (get on "already exists") and deleted (historyLimit, concurrencyPolicy Replace).
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["list", "watch", "get", "create", "delete"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# FineTuneSchedules: watched and read per pass; the operator writes their status.
- apiGroups: ["finetune.dev"]
  resources: ["finetuneschedules"]
  verbs: ["list", "watch", "get"]
- apiGroups: ["finetune.dev"]
  resources: ["finetuneschedules/status"]
  verbs: ["patch"]
# ModelServers (shared vLLM pools): watched and read per pass; the operator writes their status. A job's
# own ModelServer is created, patched and deleted by the operator.
- apiGroups: ["finetune.dev"]
  resources: ["modelservers"]
  verbs: ["list", "watch", "get", "create", "patch", "delete"]
- apiGroups: ["finetune.dev"]
  resources: ["modelservers/status"]
  verbs: ["patch"]
# A pool's desired adapters, mounted into its pods.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
# A pool's NetworkPolicy: only the operator may reach its adapter routers' admin port.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch"]
# Children, cached by watches; create-or-adopt = create, then get on "already exists".
# Jobs: suspended/resumed by patch; stage Jobs are never deleted (ownerReferences garbage-collect them), a
# FineTuneSchedule's data Job is deleted once read.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "get", "patch", "delete"]
# The vLLM Deployment: rolled by patch when spec.deployment changes, deleted when it is disabled.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "create", "get", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch", "create", "get", "delete"]
# Pods: scheduling problems, exit codes and termination messages (watched); pods/log: the trainer's
# stdout tail for training progress.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# An Event on every transition.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/*
The operator's cluster-scoped rules (operator/finetune_operator/k8s/rbac.py CLUSTER_RULES): FineTunePolicies
(watched, their status written) and namespace labels (a policy's namespaceSelector). A ClusterRole in both
modes: a Role cannot grant cluster-scoped resources.
*/}}
{{- define "finetune-operator.clusterRules" -}}
- apiGroups: ["finetune.dev"]
  resources: ["finetunepolicies"]
  verbs: ["list", "watch"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunepolicies/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}

{{/* The operator's command line, from the Deployment's own command and args (the local kubelet runs these too). */}}
{{- define "finetune-operator.args" -}}
{{- if .Values.watchNamespaces }}
{{- range .Values.watchNamespaces }}
- --namespace
- {{ . | quote }}
{{- end }}
{{- else }}
- --all-namespaces
{{- end }}
- --config
- {{ include "finetune-operator.configPath" . | quote }}
- --metrics-port
- {{ .Values.metrics.port | quote }}
- --liveness-port
- {{ .Values.livenessPort | quote }}
- --log-level
- {{ .Values.logLevel | quote }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
The OpenAI-compatible API (templates/api.yaml): its objects' name, and labels of its own (component `api`, name
`<chart>-api`) so neither the operator's Deployment nor its metrics Service selects the API's pods.
*/}}
{{- define "finetune-operator.api.fullname" -}}
{{- printf "%s-api" (include "finetune-operator.fullname" . | trunc 59 | trimSuffix "-") }}
{{- end }}

{{- define "finetune-operator.api.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-api" (include "finetune-operator.name" . | trunc 59 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-operator.api.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.api.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: api
app.kubernetes.io/part-of: finetune-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name prefix of every resource: the release name, with the chart name unless it already contains it. */}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every chart resource. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end -}}

{{/* Labels that select the operator pods (stable across upgrades). */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.peeringName" -}}
{{- default (include "kubetune.fullname" .) .Values.peering.name -}}
{{- end -}}

{{/* The operator image: repository@digest when a digest is given, else repository:tag. */}}
{{- define "kubetune.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Labels the operator puts on every trainer pod (the cross-team contract). */}}
{{- define "kubetune.trainerSelector" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/component: trainer
app.kubernetes.io/managed-by: kubetune-operator
{{- end -}}

{{/* Namespaces the trainer NetworkPolicy is created in, as a JSON list. */}}
{{- define "kubetune.networkPolicyNamespaces" -}}
{{- $namespaces := .Values.networkPolicy.namespaces | default .Values.watchNamespaces | default (list .Release.Namespace) -}}
{{- toJson $namespaces -}}
{{- end -}}

{{/*
Rules for namespaced resources, shared by the ClusterRole (all namespaces) and the per-namespace Roles.
Each verb is one the operator's code or kopf calls (tests/chart/test_rbac.py pins the set):
finetunejobs are watched, read, patched (kopf's annotations, status) and deleted after their TTL;
children are created idempotently (a 409 means "already there"), attempt Jobs are listed, patched
(suspend) and deleted; pods are only listed (termination messages, IPs).  No Secret access at all:
credentials reach trainer pods through secretKeyRef, which needs no RBAC.
*/}}
{{- define "kubetune.namespacedRules" -}}
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# Children carry blockOwnerDeletion: where OwnerReferencesPermissionEnforcement is on (OpenShift and
# others) creating them needs update on the owner's finalizers.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# get: create-if-absent checks who owns an existing object of a child's name (nothing is adopted).
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "create"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "create", "list", "watch", "patch", "delete"]
# delete: force-deletion of the job's own pods stuck Terminating on a lost node, after their grace period.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "delete"]
{{- end -}}

{{/* Cluster-scoped reads every mode needs: whether the node of a stuck pod is NotReady or gone. */}}
{{- define "kubetune.nodeRules" -}}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get"]
{{- end -}}

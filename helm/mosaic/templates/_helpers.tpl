{{/*
Names. Kubernetes names are capped at 63 characters; the suffixes appended below stay within that when the
prefix is cut to 40.
*/}}
{{- define "mosaic.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mosaic.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mosaic.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: include "mosaic.selectorLabels" (list . "router") */}}
{{- define "mosaic.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "mosaic.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Full labels of one component: include "mosaic.labels" (list . "router") */}}
{{- define "mosaic.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "mosaic.chart" $root }}
{{ include "mosaic.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: mosaic
{{- end }}

{{- define "mosaic.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "mosaic.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mosaic.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mosaic.rayClusterName" -}}
{{- printf "%s-ray" (include "mosaic.fullname" .) }}
{{- end }}

{{/* KubeRay names the head Service "<raycluster>-head-svc". */}}
{{- define "mosaic.rayAddress" -}}
{{- printf "ray://%s-head-svc.%s.svc:%d" (include "mosaic.rayClusterName" .) .Release.Namespace (int .Values.ray.clientPort) }}
{{- end }}

{{- define "mosaic.routerName" -}}
{{- printf "%s-router" (include "mosaic.fullname" .) }}
{{- end }}

{{/* The router's metrics-only Service, always ClusterIP. */}}
{{- define "mosaic.routerMetricsName" -}}
{{- printf "%s-router-metrics" (include "mosaic.fullname" .) }}
{{- end }}

{{/*
The `job` (and `service`) label of the router's scraped series: the router Service's name, as when that Service
carried the metrics port too. The ServiceMonitor sets it, and mosaic:workers_expected carries it.
*/}}
{{- define "mosaic.scrapeJob" -}}
{{- include "mosaic.routerName" . }}
{{- end }}

{{- define "mosaic.redisName" -}}
{{- printf "%s-redis" (include "mosaic.fullname" .) }}
{{- end }}

{{- define "mosaic.redisPasswordSecret" -}}
{{- default (include "mosaic.redisName" .) .Values.redis.auth.existingSecret }}
{{- end }}

{{- define "mosaic.apiKeySecret" -}}
{{- default (printf "%s-api-key" (include "mosaic.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "mosaic.rayTokenSecret" -}}
{{- default (printf "%s-ray-token" (include "mosaic.fullname" .)) .Values.ray.auth.existingSecret }}
{{- end }}

{{/* Ray's token authentication, on every process of the Ray cluster and on the router that joins it. */}}
{{- define "mosaic.rayAuthEnv" -}}
{{- if .Values.ray.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "mosaic.rayTokenSecret" . }}
      key: {{ .Values.ray.auth.existingSecretKey }}
{{- end }}
{{- end }}

{{- define "mosaic.tlsSecret" -}}
{{- default (printf "%s-tls" (include "mosaic.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/*
Bytes from an integer or a Kubernetes quantity string with a binary (Ki..Pi) or decimal (k..P) suffix, decimals
included ("1.5Gi", which values.schema.json accepts wherever it takes a quantity); a fraction of a byte is rounded
up, as Kubernetes does. Numbers arrive from values as float64, which is exact for every byte count below 2^53.
*/}}
{{- define "mosaic.bytes" -}}
{{- if kindIs "string" . }}
{{- $units := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 }}
{{- $suffix := regexFind "(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)$" . }}
{{- $digits := trimSuffix $suffix . }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?$" $digits) }}
{{- fail (printf "%q is not a byte size (a number, optionally with a Ki/Mi/Gi/Ti/Pi or k/M/G/T/P suffix)" .) }}
{{- end }}
{{- $unit := 1 }}
{{- if $suffix }}
{{- $unit = get $units $suffix }}
{{- end }}
{{- $parts := splitList "." $digits }}
{{- /* Without its leading zeros: Sprig's int64 reads "010" as octal 8, and "08" as 0. */}}
{{- $whole := regexReplaceAll "^0+([0-9])" (index $parts 0) "${1}" }}
{{- $bytes := mul (int64 $whole) $unit }}
{{- if eq (len $parts) 2 }}
{{- /* The fraction alone goes through float64: its digits times the unit, over 10^digits. */}}
{{- $fraction := index $parts 1 }}
{{- $scale := printf "1%s" (repeat (len $fraction) "0") | float64 }}
{{- $bytes = add $bytes (divf (mulf (float64 $fraction) $unit) $scale | ceil | int64) }}
{{- end }}
{{- $bytes }}
{{- else }}
{{- int64 . }}
{{- end }}
{{- end }}

{{/* GPUs of the worker group divided by GPUs per actor, rounded down. */}}
{{- define "mosaic.numWorkers" -}}
{{- $gpus := mulf (float64 .Values.ray.worker.replicas) (float64 .Values.ray.worker.gpusPerPod) }}
{{- $n := floor (divf $gpus (float64 .Values.engine.workerGpus)) | int }}
{{- if lt $n 1 }}
{{- fail (printf "the worker group has %v GPUs, fewer than engine.workerGpus=%v: no worker actor fits" $gpus .Values.engine.workerGpus) }}
{{- end }}
{{- $n }}
{{- end }}

{{/* Worker actors on one worker pod. */}}
{{- define "mosaic.actorsPerPod" -}}
{{- floor (divf (float64 .Values.ray.worker.gpusPerPod) (float64 .Values.engine.workerGpus)) | int | max 1 }}
{{- end }}

{{/* A `ray start` parameter as a string; whole numbers print without an exponent (1e+09). */}}
{{- define "mosaic.paramString" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
Every container of the chart. The root filesystem is read-only: each pod mounts a volume wherever its processes write
(docs/security.md lists them), and KubeRay's wait-gcs-ready init container copies the Ray container's security
context, environment and mounts.
*/}}
{{- define "mosaic.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
{{- end }}

{{/*
Environment of the Ray head and workers. HOME moves to the /tmp emptyDir, as on the router: the image's home
(/home/mosaic) is on the read-only root, and the caches go under HOME (~/.cache: Mosaic's tokenizer, torch and
Hugging Face; ~/.triton; CUDA's ~/.nv; Ray's ~/.ray).
*/}}
{{- define "mosaic.rayEnv" -}}
- name: HOME
  value: /tmp
{{- include "mosaic.rayAuthEnv" . }}
{{- end }}

{{/*
`ray start` directories (temp-dir, the session, logs and spilled objects; plasma-directory, the object store's
files) must be on a volume: under /tmp or /dev/shm, the emptyDirs of every Ray pod.
*/}}
{{- define "mosaic.checkRayStartDirs" -}}
{{- range $group, $params := dict "head" .Values.ray.head.rayStartParams "worker" .Values.ray.worker.rayStartParams }}
{{- range $param := list "temp-dir" "plasma-directory" }}
{{- $dir := get $params $param | toString | clean }}
{{- if and (hasKey $params $param) (not (or (hasPrefix "/tmp/" $dir) (hasPrefix "/dev/shm/" $dir) (eq $dir "/tmp") (eq $dir "/dev/shm"))) }}
{{- fail (printf "ray.%s.rayStartParams.%s=%v is on the read-only root filesystem: put it under /tmp or /dev/shm" $group $param (get $params $param)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volume for the model checkpoints, when enabled. */}}
{{- define "mosaic.modelVolume" -}}
{{- if .Values.modelStorage.enabled }}
- name: models
  persistentVolumeClaim:
    claimName: {{ required "modelStorage.existingClaim is required when modelStorage.enabled" .Values.modelStorage.existingClaim }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "mosaic.modelVolumeMount" -}}
{{- if .Values.modelStorage.enabled }}
- name: models
  mountPath: {{ .Values.modelStorage.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Access modes of the created history claim, as a YAML list. Only the worker pods mount it (the head and the router
do not), so one worker pod gets ReadWriteOnce, which every storage class offers, and more get ReadWriteMany.
An explicit history.accessModes wins, but a claim several pods write must be ReadWriteMany.
*/}}
{{- define "mosaic.historyAccessModes" -}}
{{- $numPods := int .Values.ray.worker.replicas }}
{{- $modes := .Values.history.accessModes | default (list (ternary "ReadWriteOnce" "ReadWriteMany" (le $numPods 1))) }}
{{- if and (gt $numPods 1) (not (has "ReadWriteMany" $modes)) }}
{{- fail (printf "history.accessModes=%v cannot serve ray.worker.replicas=%d worker pods, which all mount the history claim: use ReadWriteMany (or leave history.accessModes empty to choose it), or history.existingClaim" $modes $numPods) }}
{{- end }}
{{- toYaml $modes }}
{{- end }}

{{/*
Pod selector of the release's Ray pods, head and workers. KubeRay copies the pod template labels of headGroupSpec
and workerGroupSpecs onto the pods it creates (beside its own ray.io/* labels).
*/}}
{{- define "mosaic.rayPodSelector" -}}
matchLabels:
  app.kubernetes.io/name: {{ include "mosaic.name" . }}
  app.kubernetes.io/instance: {{ .Release.Name }}
matchExpressions:
  - key: app.kubernetes.io/component
    operator: In
    values:
      - ray-head
      - ray-worker
{{- end }}

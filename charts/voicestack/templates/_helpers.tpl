{{/*
Names and labels, defined once (as `helm create` does) and used by every template.
Stage templates range over "voicestack.stageNames" and complete each context with "voicestack.stage.context".
*/}}

{{- define "voicestack.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "voicestack.fullname" -}}
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

{{- define "voicestack.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "voicestack.labels" -}}
helm.sh/chart: {{ include "voicestack.chart" . }}
{{ include "voicestack.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: voicestack
{{- end }}

{{- define "voicestack.selectorLabels" -}}
app.kubernetes.io/name: {{ include "voicestack.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The stages in pipeline order, as their keys under `stages` (JSON: range over `include ... | fromJsonArray`).
llm and llmStrong are the two LLM pools (the edge routes each turn to one): the same templates
render both, each its own Deployment, Service, autoscaler, PDB and NetworkPolicy.
*/}}
{{- define "voicestack.stageNames" -}}
["edge", "vad", "stt", "llm", "llmStrong", "tts"]
{{- end }}

{{/*
Completes a stage context in place. Call it with (dict "root" $ "key" <key under stages>); it adds
  stage:   the values under stages.<key>;
  name:    the component: the suffix of resource names, app.kubernetes.io/component, the container
           name and the `stage` label of its metrics; for an LLM pool, the pool (llm, llm-strong);
  service: what the container runs (`voicestack serve <service>`): llm for both LLM pools.
*/}}
{{- define "voicestack.stage.context" -}}
{{- $pools := dict "llm" "llm" "llmStrong" "llm-strong" }}
{{- $_ := set . "stage" (index .root.Values.stages .key | default dict) }}
{{- $_ := set . "name" (get $pools .key | default .key) }}
{{- $_ := set . "service" (ternary "llm" .key (hasKey $pools .key)) }}
{{- end }}

{{/* ---- per-stage helpers; context: dict "root" "key" "name" "service" "stage" (see above) ---- */}}

{{- define "voicestack.stage.fullname" -}}
{{- printf "%s-%s" (include "voicestack.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "voicestack.stage.labels" -}}
{{ include "voicestack.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "voicestack.stage.selectorLabels" -}}
{{ include "voicestack.selectorLabels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "voicestack.stage.image" -}}
{{- $root := .root }}
{{- $img := .stage.image }}
{{- $repo := $img.repository | default (printf "%s-%s" $root.Values.image.repository $img.target) }}
{{- $tag := $img.tag | default $root.Values.image.tag | default $root.Chart.AppVersion }}
{{- if $img.digest }}
{{- /* A digest pins the image: the tag is left out (repository@sha256:...). */ -}}
{{- printf "%s@%s" $repo $img.digest }}
{{- else }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}
{{- end }}

{{/* The extended-resource name this stage's GPUs are asked as: stages.<key>.gpuResourceName, else gpuResourceName. */}}
{{- define "voicestack.stage.gpuResourceName" -}}
{{- .stage.gpuResourceName | default .root.Values.gpuResourceName }}
{{- end }}

{{/* The pod's RuntimeClass: stages.<key>.runtimeClassName, else gpuRuntimeClassName for a pod that holds a GPU. */}}
{{- define "voicestack.stage.runtimeClassName" -}}
{{- if .stage.runtimeClassName }}{{ .stage.runtimeClassName }}
{{- else if gt (int (.stage.gpu | default 0)) 0 }}{{ .root.Values.gpuRuntimeClassName | default "" }}
{{- end }}
{{- end }}

{{/*
User-supplied containers (stages.<key>.initContainers / extraContainers), passed through as they are,
except that one without a securityContext gets the chart's (non-root, read-only root, no capabilities).
Context: dict "root" "containers".
*/}}
{{- define "voicestack.userContainers" -}}
{{- range .containers }}
{{- $c := deepCopy . }}
{{- if not (hasKey $c "securityContext") }}
{{- $_ := set $c "securityContext" (deepCopy $.root.Values.securityContext) }}
{{- end }}
- {{ toYaml $c | indent 2 | trim }}
{{- end }}
{{- end }}

{{/* Seconds a terminating replica drains (VOICESTACK_DRAIN_SECONDS). */}}
{{- define "voicestack.stage.drainSeconds" -}}
{{- if kindIs "invalid" .stage.drainSeconds }}{{ .root.Values.drain.seconds }}{{ else }}{{ .stage.drainSeconds }}{{ end }}
{{- end }}

{{/* preStop sleep + drain + margin, rounded up: the kubelet never SIGKILLs a draining replica. */}}
{{- define "voicestack.stage.terminationGracePeriodSeconds" -}}
{{- $d := .root.Values.drain }}
{{- $drain := include "voicestack.stage.drainSeconds" . | float64 | ceil | int }}
{{- add $d.preStopSleepSeconds $drain $d.marginSeconds }}
{{- end }}

{{/* "true" when this stage is scaled by KEDA or an HPA (then the Deployment leaves replicas out). */}}
{{- define "voicestack.stage.autoscaled" -}}
{{- if and .root.Values.autoscaling.enabled .stage.autoscaling.enabled }}true{{ end }}
{{- end }}

{{/* The LLM engine of this stage ("" for the stages that are not an LLM pool). */}}
{{- define "voicestack.stage.llmEngine" -}}
{{- if eq .service "llm" }}{{ .stage.engine }}{{ end }}
{{- end }}

{{/* "true" when the GPU goes to the vLLM sidecar rather than the stage container. */}}
{{- define "voicestack.stage.vllm" -}}
{{- if eq (include "voicestack.stage.llmEngine" .) "vllm" }}true{{ end }}
{{- end }}

{{- define "voicestack.stage.device" -}}
{{- if .stage.device }}{{ .stage.device }}
{{- else if and (gt (int .stage.gpu) 0) (not (include "voicestack.stage.vllm" .)) (ne .name "vad") }}cuda
{{- else }}cpu{{ end }}
{{- end }}

{{/* resources with the GPU added to limits and requests. Context: dict "resources" "gpu" "gpuName". */}}
{{- define "voicestack.resources" -}}
{{- $res := deepCopy (.resources | default dict) }}
{{- if gt (int .gpu) 0 }}
{{- $_ := set $res "limits" (merge (dict .gpuName (int .gpu)) (get $res "limits" | default dict)) }}
{{- $_ := set $res "requests" (merge (dict .gpuName (int .gpu)) (get $res "requests" | default dict)) }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* PromQL matchers selecting this stage's pods of this release. */}}
{{- define "voicestack.stage.promMatchers" -}}
{{- $p := .root.Values.autoscaling.prometheus }}
{{- printf "stage=%q,%s=%q,%s=~%q" .name $p.namespaceLabel .root.Release.Namespace $p.podLabel (printf "%s-[a-z0-9]+-[a-z0-9]+" (include "voicestack.stage.fullname" .)) }}
{{- end }}

{{/*
Stream utilisation of the stage, 0..1: the autoscaling signal, smoothed. A stream (a turn, a call) lasts
seconds to minutes and one scrape sees a sawtooth, so each replica's gauges are averaged over
autoscaling.keda.window (avg_over_time) before they are summed; a window of "0s" reads the instant value.
*/}}
{{- define "voicestack.stage.utilisationQuery" -}}
{{- $m := include "voicestack.stage.promMatchers" . }}
{{- $w := (.root.Values.autoscaling.keda.window | default "1m") }}
{{- if regexMatch "^0+[smh]?$" $w }}
{{- printf "sum(voicestack_streams_active{%s}) / clamp_min(sum(voicestack_streams_capacity{%s}), 1)" $m $m }}
{{- else }}
{{- printf "sum(avg_over_time(voicestack_streams_active{%s}[%s])) / clamp_min(sum(avg_over_time(voicestack_streams_capacity{%s}[%s])), 1)" $m $w $m $w }}
{{- end }}
{{- end }}

{{/* KEDA's authentication to Prometheus: the authenticationRef of the triggers ({} = none). Context: the root. */}}
{{- define "voicestack.keda.authenticationRef" -}}
{{- $auth := .Values.autoscaling.keda.authentication | default dict }}
{{- if $auth.secretTargetRef }}
{{- toJson (dict "name" (printf "%s-prometheus" (include "voicestack.fullname" .))) }}
{{- else if ($auth.existingRef | default dict).name }}
{{- toJson $auth.existingRef }}
{{- else }}{}
{{- end }}
{{- end }}

{{/* HPA behavior block (also used inside KEDA's ScaledObject). */}}
{{- define "voicestack.stage.behavior" -}}
scaleUp:
  stabilizationWindowSeconds: {{ .stage.autoscaling.scaleUpStabilizationWindowSeconds }}
  selectPolicy: Max
  policies:
    - {type: Percent, value: 100, periodSeconds: 30}
    - {type: Pods, value: 4, periodSeconds: 30}
scaleDown:
  stabilizationWindowSeconds: {{ .stage.autoscaling.scaleDownStabilizationWindowSeconds }}
  selectPolicy: Min
  policies:
    - {type: Pods, value: 1, periodSeconds: 60}
{{- end }}

{{/*
The autoscaler of a stage or a gateway (context as above; the gateways' has the same shape, see
_gateways.tpl): a KEDA ScaledObject on stream utilisation (autoscaling.keda), else an HPA on the Pods
metric voicestack_streams_active from the Prometheus Adapter (autoscaling.hpa), else an HPA on CPU.
*/}}
{{- define "voicestack.autoscaler" -}}
{{- $root := .root }}
{{- $stage := .stage }}
{{- $a := $stage.autoscaling }}
{{- if $root.Values.autoscaling.keda.enabled -}}
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ include "voicestack.stage.fullname" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "voicestack.stage.labels" . | nindent 4 }}
  {{- if $root.Values.autoscaling.keda.transferHpaOwnership }}
  annotations:
    # Adopt the HPA of the same name (advanced.horizontalPodAutoscalerConfig.name) that the CPU or Prometheus
    # Adapter mode left: without it KEDA's webhook refuses a ScaledObject whose Deployment an HPA already scales.
    scaledobject.keda.sh/transfer-hpa-ownership: "true"
  {{- end }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "voicestack.stage.fullname" . }}
  minReplicaCount: {{ $a.minReplicas }}
  maxReplicaCount: {{ $a.maxReplicas }}
  pollingInterval: {{ $root.Values.autoscaling.keda.pollingInterval }}
  advanced:
    horizontalPodAutoscalerConfig:
      name: {{ include "voicestack.stage.fullname" . }}
      behavior:
        {{- include "voicestack.stage.behavior" . | nindent 8 }}
  triggers:
    - type: prometheus
      name: stream-utilisation
      metricType: Value
      metadata:
        serverAddress: {{ $root.Values.autoscaling.prometheus.serverAddress | quote }}
        query: {{ include "voicestack.stage.utilisationQuery" . | quote }}
        threshold: {{ $a.targetUtilization | toString | quote }}
        # No series (Prometheus down, the targets lost) is an error, and the HPA keeps the replicas it has,
        # rather than a 0 that would scale the stage to its minimum at peak.
        ignoreNullValues: "false"
        {{- with ($root.Values.autoscaling.keda.authentication | default dict).modes }}
        authModes: {{ . | quote }}
        {{- end }}
      {{- with include "voicestack.keda.authenticationRef" $root | fromJson }}
      authenticationRef:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- else -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "voicestack.stage.fullname" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "voicestack.stage.labels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "voicestack.stage.fullname" . }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  behavior:
    {{- include "voicestack.stage.behavior" . | nindent 4 }}
  metrics:
    {{- if $root.Values.autoscaling.hpa.enabled }}
    # Streams (a gateway: calls) in flight per pod, from the Prometheus Adapter (custom.metrics.k8s.io).
    - type: Pods
      pods:
        metric:
          name: voicestack_streams_active
          selector:
            matchLabels: {stage: {{ .name }}}
        target:
          type: AverageValue
          averageValue: {{ printf "%dm" (round (mulf $stage.capacity $a.targetUtilization 1000) 0 | int) | quote }}
    {{- else }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $a.targetCPUUtilization }}
    {{- end }}
{{- end }}
{{- end }}

{{/* A grpc.health.v1 probe on the gRPC port; TCP for an edge serving TLS (kubelet probes plaintext only). */}}
{{- define "voicestack.stage.probe" -}}
{{- if and (eq .ctx.name "edge") .ctx.stage.tls.secretName -}}
tcpSocket:
  port: grpc
{{- else -}}
grpc:
  port: 50051
{{- end }}
periodSeconds: {{ .probe.periodSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
{{- end }}

{{/* Environment of a stage container: the runtime contract of services/voicestack/config.py. */}}
{{- define "voicestack.stage.env" -}}
{{- $root := .root }}
{{- $s := .stage -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: NODE_NAME
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
- name: VOICESTACK_REPLICA_ID
  value: "$(POD_NAME)"
- name: VOICESTACK_GRPC_HOST
  value: "0.0.0.0"
- name: VOICESTACK_GRPC_PORT
  value: "50051"
- name: VOICESTACK_METRICS_HOST
  value: "0.0.0.0"
- name: VOICESTACK_METRICS_PORT
  value: "9464"
- name: VOICESTACK_NATS_URL
  value: {{ include "voicestack.nats.url" $root | quote }}
{{- if $root.Values.nats.credentials.secretName }}
- name: VOICESTACK_NATS_CREDS_FILE
  value: "/etc/voicestack/nats-creds/{{ $root.Values.nats.credentials.key }}"
{{- end }}
{{- if $root.Values.nats.tls.caSecretName }}
- name: VOICESTACK_NATS_CA_FILE
  value: "/etc/voicestack/nats-ca/{{ $root.Values.nats.tls.caKey }}"
{{- end }}
{{- include "voicestack.nats.env" . }}
- name: VOICESTACK_CAPACITY
  value: {{ $s.capacity | quote }}
- name: VOICESTACK_DRAIN_SECONDS
  value: {{ include "voicestack.stage.drainSeconds" . | quote }}
- name: VOICESTACK_DEVICE
  value: {{ include "voicestack.stage.device" . | quote }}
- name: VOICESTACK_CACHE_DIR
  value: {{ $root.Values.scratch.cacheDir | quote }}
- name: HOME
  value: /tmp
- name: HF_HOME
  value: "{{ $root.Values.scratch.cacheDir }}/huggingface"
{{- if eq .name "edge" }}
{{- if $s.tls.secretName }}
- name: VOICESTACK_TLS_CERT_FILE
  value: /etc/voicestack/tls/tls.crt
- name: VOICESTACK_TLS_KEY_FILE
  value: /etc/voicestack/tls/tls.key
{{- end }}
{{- if $s.apiKeys.secretName }}
- name: VOICESTACK_API_KEYS_FILE
  value: "/etc/voicestack/api-keys/{{ $s.apiKeys.key }}"
{{- end }}
{{- if $s.tools.file }}
- name: VOICESTACK_TOOLS_FILE
  value: /etc/voicestack/tools/tools.yaml
{{- end }}
{{- with $s.tools.allowedHosts }}
- name: VOICESTACK_TOOLS_ALLOWED_HOSTS
  value: {{ join "," . | quote }}
{{- end }}
{{- with $s.tools.filler }}
- name: VOICESTACK_TOOL_FILLER
  value: {{ . | quote }}
{{- end }}
{{- with $s.llmRouting }}
- name: VOICESTACK_LLM_ROUTING
  value: {{ . | quote }}
{{- end }}
{{- with $s.processors }}
- name: VOICESTACK_PROCESSORS
  value: {{ . | quote }}
{{- end }}
{{- if $s.piiRedactLlm }}
- name: VOICESTACK_PII_REDACT_LLM
  value: "true"
{{- end }}
{{- with $s.contentFilter }}
{{- if .words }}
- name: VOICESTACK_CONTENT_FILTER_WORDS_FILE
  value: /etc/voicestack/content-filter/words.txt
{{- end }}
{{- with .text }}
- name: VOICESTACK_CONTENT_FILTER_TEXT
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- if include "voicestack.recording.enabled" $root }}
{{- $rec := $s.recording }}
- name: VOICESTACK_RECORDING
  value: "true"
{{ include "voicestack.recording.storeEnv" $root }}
{{- with $rec.consentText }}
- name: VOICESTACK_CONSENT_TEXT
  value: {{ . | quote }}
{{- end }}
{{- with $rec.consentYesText }}
- name: VOICESTACK_CONSENT_YES_TEXT
  value: {{ . | quote }}
{{- end }}
{{- with $rec.consentNoText }}
- name: VOICESTACK_CONSENT_NO_TEXT
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq .name "stt") $s.model }}
- name: VOICESTACK_STT_MODEL
  value: {{ $s.model | quote }}
{{- end }}
{{- if and (eq .name "tts") $s.voice }}
- name: VOICESTACK_TTS_VOICE
  value: {{ $s.voice | quote }}
{{- end }}
{{- if eq .service "llm" }}
# The pool this replica serves: its own NATS subjects (the edge routes each turn to one).
- name: VOICESTACK_LLM_POOL
  value: {{ .name | quote }}
{{- if eq $s.engine "vllm" }}
- name: VOICESTACK_LLM_ENGINE
  value: openai
- name: VOICESTACK_LLM_URL
  value: "http://127.0.0.1:{{ $s.vllm.port }}/v1"
- name: VOICESTACK_LLM_MODEL
  value: {{ $s.vllm.model | quote }}
{{- else if eq $s.engine "external" }}
- name: VOICESTACK_LLM_ENGINE
  value: openai
- name: VOICESTACK_LLM_URL
  value: {{ required (printf "stages.%s.external.url is required when stages.%s.engine is external" .key .key) $s.external.url | quote }}
- name: VOICESTACK_LLM_MODEL
  value: {{ $s.external.model | quote }}
{{- with $s.external.apiKeySecret }}{{ if .name }}
- name: VOICESTACK_LLM_API_KEY
  valueFrom: {secretKeyRef: {name: {{ .name | quote }}, key: {{ .key | quote }}}}
{{- end }}{{ end }}
{{- else }}
- name: VOICESTACK_LLM_ENGINE
  value: llamacpp
{{- if $s.model }}
- name: VOICESTACK_LLM_MODEL
  value: {{ $s.model | quote }}
{{- end }}
{{- end }}
{{- end }}
- name: OTEL_SERVICE_NAME
  value: "voicestack-{{ .name }}"
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "service.instance.id=$(POD_NAME),k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),k8s.node.name=$(NODE_NAME),k8s.deployment.name={{ include "voicestack.stage.fullname" . }}{{ with $root.Values.otel.resourceAttributes }},{{ . }}{{ end }}"
{{- with $root.Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- range $k, $v := $s.env }}
- name: {{ $k }}
  value: {{ $v | toString | quote }}
{{- end }}
{{- with $s.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Call recording (stages.edge.recording): shared by the edge and the retention CronJob, which run
with the same store, credentials, volumes and audit log. Context: the root ($).
  the recording volume, an existing PVC, at /var/lib/voicestack/recordings (a path store lives there);
  the audit log at /var/lib/voicestack/audit/audit.jsonl on auditLog.claimName, else beside the recordings.
*/}}
{{- define "voicestack.recording.volumePath" -}}/var/lib/voicestack/recordings{{- end }}
{{- define "voicestack.recording.auditPath" -}}/var/lib/voicestack/audit{{- end }}

{{/* The audit log file; fails the render when no volume can hold it. */}}
{{- define "voicestack.recording.auditLog" -}}
{{- $rec := .Values.stages.edge.recording }}
{{- if $rec.auditLog.claimName }}
{{- printf "%s/audit.jsonl" (include "voicestack.recording.auditPath" .) }}
{{- else if $rec.volume.claimName }}
{{- printf "%s/audit.jsonl" (include "voicestack.recording.volumePath" .) }}
{{- else }}
{{- fail "stages.edge.recording.enabled is true but the audit log has no durable volume: set stages.edge.recording.auditLog.claimName (an existing PVC) or stages.edge.recording.volume.claimName; retention, export and erase append to it" }}
{{- end }}
{{- end }}

{{/* Fails the render on settings the edge or `voicestack retention` would refuse at start. */}}
{{- define "voicestack.recording.validate" -}}
{{- $rec := .Values.stages.edge.recording }}
{{- $store := $rec.store | default "" | trim }}
{{- if not $store }}
{{- fail "stages.edge.recording.enabled is true but stages.edge.recording.store is empty (the edge refuses to start without one): set it to s3://bucket (with stages.edge.recording.s3.endpoint and .secretName) or to a path on the recording volume, /var/lib/voicestack/recordings (with stages.edge.recording.volume.claimName)" }}
{{- end }}
{{- if hasPrefix "s3://" $store }}
{{- if not (regexMatch "^s3://[^/]+/?$" $store) }}
{{- fail (printf "stages.edge.recording.store %q: want s3://bucket (no path after the bucket)" $store) }}
{{- end }}
{{- if or (not $rec.s3.endpoint) (not $rec.s3.secretName) }}
{{- fail "stages.edge.recording.store is s3://... but stages.edge.recording.s3.endpoint or stages.edge.recording.s3.secretName is empty: set the endpoint URL and an existing Secret with keys access-key and secret-key" }}
{{- end }}
{{- else }}
{{- $path := trimPrefix "file://" $store | trimSuffix "/" }}
{{- $mount := include "voicestack.recording.volumePath" . }}
{{- if or (not (or (eq $path $mount) (hasPrefix (printf "%s/" $mount) $path))) (contains "/../" (printf "%s/" $path)) }}
{{- fail (printf "stages.edge.recording.store %q: a volume store must be on the recording volume, %s (or file://%s), or use s3://bucket" $store $mount $mount) }}
{{- end }}
{{- if not $rec.volume.claimName }}
{{- fail (printf "stages.edge.recording.store %q is a path: set stages.edge.recording.volume.claimName (an existing PVC, ReadWriteMany with more than one edge)" $store) }}
{{- end }}
{{- end }}
{{- $_ := include "voicestack.recording.auditLog" . }}
{{- end }}

{{/* Store, credentials, retention and audit log: the environment of the edge and of `voicestack retention`. */}}
{{- define "voicestack.recording.storeEnv" -}}
{{- include "voicestack.recording.validate" . }}
{{- $rec := .Values.stages.edge.recording -}}
- name: VOICESTACK_RECORDING_STORE
  value: {{ $rec.store | trim | quote }}
{{- if hasPrefix "s3://" ($rec.store | trim) }}
- name: VOICESTACK_RECORDING_S3_ENDPOINT
  value: {{ $rec.s3.endpoint | quote }}
- name: VOICESTACK_RECORDING_S3_REGION
  value: {{ $rec.s3.region | default "us-east-1" | quote }}
- name: VOICESTACK_RECORDING_S3_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ $rec.s3.secretName | quote }}, key: access-key}}
- name: VOICESTACK_RECORDING_S3_SECRET_KEY
  valueFrom: {secretKeyRef: {name: {{ $rec.s3.secretName | quote }}, key: secret-key}}
{{- end }}
- name: VOICESTACK_RECORDING_RETENTION_DAYS
  value: {{ $rec.retentionDays | toString | quote }}
- name: VOICESTACK_RECORDING_AUDIT_LOG
  value: {{ include "voicestack.recording.auditLog" . | quote }}
{{- end }}

{{/* Volume mounts (container) and volumes (pod) of the recording and audit PVCs; empty when neither is set. */}}
{{- define "voicestack.recording.volumeMounts" -}}
{{- $rec := .Values.stages.edge.recording }}
{{- if $rec.volume.claimName }}
- {name: recordings, mountPath: {{ include "voicestack.recording.volumePath" . }}}
{{- end }}
{{- if $rec.auditLog.claimName }}
- {name: audit, mountPath: {{ include "voicestack.recording.auditPath" . }}}
{{- end }}
{{- end }}

{{- define "voicestack.recording.volumes" -}}
{{- $rec := .Values.stages.edge.recording }}
{{- if $rec.volume.claimName }}
- name: recordings
  persistentVolumeClaim: {claimName: {{ $rec.volume.claimName | quote }}}
{{- end }}
{{- if $rec.auditLog.claimName }}
- name: audit
  persistentVolumeClaim: {claimName: {{ $rec.auditLog.claimName | quote }}}
{{- end }}
{{- end }}

{{/* "true" when call recording is on (tolerates values from a release older than the setting). */}}
{{- define "voicestack.recording.enabled" -}}
{{- if (.Values.stages.edge.recording | default dict).enabled }}true{{ end }}
{{- end }}

{{/*
The vLLM server of an LLM pool with engine vllm (stages.llm.vllm, stages.llmStrong.vllm), run the way
the anchor charts (vLLM production-stack, NVIDIA NIM) run it:
  - mode native: a native sidecar (an init container with restartPolicy Always, Kubernetes >= 1.29): the
    kubelet starts the stage only once vLLM's startup probe passed, and stops vLLM only after the stage
    container has exited (drained); mode container: a second ordinary container, whose preStop sleep
    outlives the stage's drain (any Kubernetes the chart supports);
  - non-root: HOME, USER and LOGNAME are set (vLLM images have no passwd entry for the pod's uid, and
    torch's getpass.getuser() fails without one of them), every cache lives in the /tmp emptyDir;
  - a pinned revision (--revision / --tokenizer-revision) and HF_HUB_OFFLINE=1 whenever the weights come
    from a volume (filled once by a Job, or by an init container) or from the image.
Every helper takes the stage context (dict "root" "key" "name" "service" "stage", see _helpers.tpl).
*/}}

{{/* native or container. */}}
{{- define "voicestack.vllm.mode" -}}
{{- .stage.vllm.mode | default "native" }}
{{- end }}

{{/* download, initContainer, volume or image. */}}
{{- define "voicestack.vllm.modelSource" -}}
{{- .stage.vllm.modelSource | default "download" }}
{{- end }}

{{/* "true" when vLLM must not reach the Hugging Face Hub (the weights are in a volume or in the image). */}}
{{- define "voicestack.vllm.offline" -}}
{{- if ne (include "voicestack.vllm.modelSource" .) "download" }}true{{ end }}
{{- end }}

{{/* "true" when `model` is a path (inside the model volume or the image), not a Hugging Face id. */}}
{{- define "voicestack.vllm.modelIsPath" -}}
{{- if hasPrefix "/" .stage.vllm.model }}true{{ end }}
{{- end }}

{{/* "true" when a container of the pod downloads from the Hub (vLLM itself, or the download init container). */}}
{{- define "voicestack.vllm.downloads" -}}
{{- if has (include "voicestack.vllm.modelSource" .) (list "download" "initContainer") }}true{{ end }}
{{- end }}

{{/* The existing PVC holding the Hugging Face cache; "" when modelVolume is used. */}}
{{- define "voicestack.vllm.claimName" -}}
{{- ((.stage.vllm.modelClaim | default dict).name | default "") }}
{{- end }}

{{/* Most replicas the pool may run: the autoscaler's maximum, else its fixed replica count. */}}
{{- define "voicestack.vllm.maxReplicas" -}}
{{- if include "voicestack.stage.autoscaled" . }}{{ .stage.autoscaling.maxReplicas }}{{ else }}{{ .stage.replicas }}{{ end }}
{{- end }}

{{/* Fails the render on a vLLM set-up that cannot start, or that breaks when it scales. */}}
{{- define "voicestack.vllm.validate" -}}
{{- $v := .stage.vllm }}
{{- $key := .key }}
{{- $mode := include "voicestack.vllm.mode" . }}
{{- $source := include "voicestack.vllm.modelSource" . }}
{{- $claim := include "voicestack.vllm.claimName" . }}
{{- if and (eq $mode "native") (semverCompare "<1.29.0-0" .root.Capabilities.KubeVersion.Version) }}
{{- fail (printf "stages.%s.vllm.mode is native (a native sidecar: an init container with restartPolicy Always), which needs Kubernetes >= 1.29; this cluster is %s: set stages.%s.vllm.mode=container" $key .root.Capabilities.KubeVersion.Version $key) }}
{{- end }}
{{- if and (eq $source "initContainer") (include "voicestack.vllm.modelIsPath" .) }}
{{- fail (printf "stages.%s.vllm.modelSource initContainer downloads a Hugging Face model id, but stages.%s.vllm.model is a path (%s): use modelSource volume or image for a path" $key $key $v.model) }}
{{- end }}
{{- if and (eq $source "volume") (not $claim) (hasKey ($v.modelVolume | default dict) "emptyDir") }}
{{- fail (printf "stages.%s.vllm.modelSource is volume (vLLM runs offline from a filled volume) but the model volume is an emptyDir: set stages.%s.vllm.modelClaim.name to a filled PVC (stages.%s.vllm.fillJob fills it once), or use modelSource download, initContainer or image" $key $key $key) }}
{{- end }}
{{- if ($v.fillJob | default dict).enabled }}
{{- if or (ne $source "volume") (not $claim) }}
{{- fail (printf "stages.%s.vllm.fillJob fills an existing PVC that vLLM then reads offline: set stages.%s.vllm.modelSource=volume and stages.%s.vllm.modelClaim.name" $key $key $key) }}
{{- end }}
{{- if include "voicestack.vllm.modelIsPath" . }}
{{- fail (printf "stages.%s.vllm.fillJob downloads a Hugging Face model id, but stages.%s.vllm.model is a path (%s)" $key $key $v.model) }}
{{- end }}
{{- end }}
{{- if and $claim (ne $source "image") }}
{{- $access := $v.modelClaim.accessMode | default "ReadWriteMany" }}
{{- /* The claim's real access modes when the cluster can be asked (install, upgrade); the declared one otherwise. */ -}}
{{- $found := lookup "v1" "PersistentVolumeClaim" .root.Release.Namespace $claim }}
{{- $modes := list $access }}
{{- if $found }}{{ $modes = $found.spec.accessModes | default $modes }}{{ end }}
{{- $max := include "voicestack.vllm.maxReplicas" . | int }}
{{- if and (gt $max 1) (not (or (has "ReadWriteMany" $modes) (has "ReadOnlyMany" $modes))) }}
{{- fail (printf "stages.%s.vllm.modelClaim %s is %s but the pool may run %d replicas (stages.%s.%s): replicas on other nodes cannot attach it (Multi-Attach error), so scale-out fails at peak. Use a ReadWriteMany (or ReadOnlyMany, filled elsewhere) claim, modelSource initContainer with an emptyDir modelVolume (each pod downloads), modelSource image, or at most 1 replica" $key $claim (join "," $modes) $max $key (ternary "autoscaling.maxReplicas" "replicas" (eq (include "voicestack.stage.autoscaled" .) "true"))) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The chart's container security context with stages.<key>.vllm.securityContext over it. */}}
{{- define "voicestack.vllm.securityContext" -}}
{{- toYaml (merge (deepCopy (.stage.vllm.securityContext | default dict)) (deepCopy .root.Values.securityContext)) }}
{{- end }}

{{/* The image of vLLM (and of its download init container and fill Job): image, or image@digest. */}}
{{- define "voicestack.vllm.image" -}}
{{- $v := .stage.vllm }}
{{- if $v.digest }}{{ printf "%s@%s" (regexReplaceAll ":[^:/]+$" $v.image "") $v.digest }}{{ else }}{{ $v.image }}{{ end }}
{{- end }}

{{/* Environment shared by vLLM and its downloaders: a writable HOME, a user name, the caches, the Hub. */}}
{{- define "voicestack.vllm.baseEnv" -}}
{{- $v := .stage.vllm -}}
# Non-root without a passwd entry: torch's getpass.getuser() reads USER/LOGNAME; HOME is the /tmp emptyDir.
- {name: HOME, value: /tmp}
- {name: USER, value: vllm}
- {name: LOGNAME, value: vllm}
{{- if ne (include "voicestack.vllm.modelSource" .) "image" }}
- {name: HF_HOME, value: /models/huggingface}
{{- end }}
- {name: XDG_CACHE_HOME, value: /tmp/.cache}
- {name: XDG_CONFIG_HOME, value: /tmp/.config}
{{- with $v.hfTokenSecret }}{{ if .name }}
- name: HF_TOKEN
  valueFrom: {secretKeyRef: {name: {{ .name | quote }}, key: {{ .key | quote }}}}
{{- end }}{{ end }}
{{- end }}

{{/* The vLLM container (a list item). Context: the stage context; .native true renders it as a native sidecar. */}}
{{- define "voicestack.vllm.container" -}}
{{- $root := .root }}
{{- $v := .stage.vllm }}
{{- $native := eq (include "voicestack.vllm.mode" .) "native" }}
{{- $drain := include "voicestack.stage.drainSeconds" . | float64 | ceil | int }}
{{- $preStop := int $root.Values.drain.preStopSleepSeconds -}}
- name: vllm
  image: {{ include "voicestack.vllm.image" . | quote }}
  imagePullPolicy: {{ $v.pullPolicy }}
  {{- if $native }}
  # A native sidecar: started (and its startup probe passed) before the stage, stopped after it has drained.
  restartPolicy: Always
  {{- end }}
  command: ["vllm", "serve"]
  args:
    - {{ $v.model | quote }}
    - "--host=0.0.0.0"
    - "--port={{ $v.port }}"
    - "--gpu-memory-utilization={{ $v.gpuMemoryUtilization }}"
    {{- if and $v.revision (not (include "voicestack.vllm.modelIsPath" .)) }}
    - "--revision={{ $v.revision }}"
    - "--tokenizer-revision={{ $v.revision }}"
    {{- end }}
    {{- if $v.enablePrefixCaching }}
    - "--enable-prefix-caching"
    {{- else }}
    - "--no-enable-prefix-caching"
    {{- end }}
    {{- if gt (int $v.maxModelLen) 0 }}
    - "--max-model-len={{ $v.maxModelLen }}"
    {{- end }}
    {{- if $v.toolCallParser }}
    - "--enable-auto-tool-choice"
    - "--tool-call-parser={{ $v.toolCallParser }}"
    {{- end }}
    {{- range $v.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  ports:
    - {name: vllm, containerPort: {{ $v.port }}, protocol: TCP}
  env:
    {{- include "voicestack.vllm.baseEnv" . | nindent 4 }}
    - {name: VLLM_CACHE_ROOT, value: /tmp/.cache/vllm}
    - {name: VLLM_CONFIG_ROOT, value: /tmp/.config/vllm}
    - {name: TRITON_CACHE_DIR, value: /tmp/.cache/triton}
    - {name: TORCHINDUCTOR_CACHE_DIR, value: /tmp/.cache/torchinductor}
    - {name: NUMBA_CACHE_DIR, value: /tmp/.cache/numba}
    # No usage reports to the vLLM project (the NetworkPolicy would drop them anyway).
    - {name: VLLM_NO_USAGE_STATS, value: "1"}
    - {name: DO_NOT_TRACK, value: "1"}
    {{- if include "voicestack.vllm.offline" . }}
    # The weights are in {{ if eq (include "voicestack.vllm.modelSource" .) "image" }}the image{{ else }}the model volume{{ end }}: never reach the Hugging Face Hub.
    - {name: HF_HUB_OFFLINE, value: "1"}
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  startupProbe:
    httpGet: {path: /health, port: vllm}
    periodSeconds: 10
    failureThreshold: 180
  readinessProbe:
    httpGet: {path: /health, port: vllm}
    periodSeconds: 5
    failureThreshold: 3
  livenessProbe:
    httpGet: {path: /health, port: vllm}
    periodSeconds: 10
    failureThreshold: 3
    timeoutSeconds: 5
  {{- if not $native }}
  lifecycle:
    # Outlive the stage's drain: the streams it finishes still need the model.
    preStop:
      exec:
        command: ["sleep", "{{ add $preStop $drain }}"]
  {{- end }}
  resources:
    {{- include "voicestack.resources" (dict "resources" $v.resources "gpu" .stage.gpu "gpuName" (include "voicestack.stage.gpuResourceName" .)) | nindent 4 }}
  securityContext:
    {{- include "voicestack.vllm.securityContext" . | nindent 4 }}
  volumeMounts:
    - {name: vllm-tmp, mountPath: /tmp}
    {{- if ne (include "voicestack.vllm.modelSource" .) "image" }}
    - {name: vllm-models, mountPath: /models}
    {{- end }}
    - {name: dshm, mountPath: /dev/shm}
{{- end }}

{{/* The downloader (a list item): fetches model at revision into the Hugging Face cache on /models. */}}
{{- define "voicestack.vllm.downloadContainer" -}}
{{- $v := .stage.vllm -}}
- name: {{ .containerName | default "vllm-download" }}
  image: {{ include "voicestack.vllm.image" . | quote }}
  imagePullPolicy: {{ $v.pullPolicy }}
  # huggingface_hub ships in the vLLM image; a filled cache costs a check, not a download.
  command: ["python3", "-c"]
  args:
    - |
      import os
      from huggingface_hub import snapshot_download
      path = snapshot_download(repo_id=os.environ["VLLM_MODEL"], revision=os.environ.get("VLLM_REVISION") or None)
      print("model ready:", path)
  env:
    {{- include "voicestack.vllm.baseEnv" . | nindent 4 }}
    - {name: VLLM_MODEL, value: {{ $v.model | quote }}}
    - {name: VLLM_REVISION, value: {{ $v.revision | default "" | quote }}}
  resources:
    {{- toYaml (($v.downloader | default dict).resources | default (dict "requests" (dict "cpu" "500m" "memory" "1Gi") "limits" (dict "cpu" "2" "memory" "4Gi"))) | nindent 4 }}
  securityContext:
    {{- include "voicestack.vllm.securityContext" . | nindent 4 }}
  volumeMounts:
    - {name: vllm-tmp, mountPath: /tmp}
    - {name: vllm-models, mountPath: /models}
{{- end }}

{{/* The model volume (a list item): the claim, else modelVolume. */}}
{{- define "voicestack.vllm.modelVolume" -}}
- name: vllm-models
  {{- with include "voicestack.vllm.claimName" . }}
  persistentVolumeClaim: {claimName: {{ . | quote }}}
  {{- else }}
  {{- toYaml .stage.vllm.modelVolume | nindent 2 }}
  {{- end }}
{{- end }}

{{/* "true" when PodMonitors scrape the vLLM servers (metrics.podMonitor.enabled and .vllm). Context: the root. */}}
{{- define "voicestack.metrics.scrapesVllm" -}}
{{- $pm := .Values.metrics.podMonitor | default dict }}
{{- if and $pm.enabled $pm.vllm }}true{{ end }}
{{- end }}

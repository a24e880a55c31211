{{/*
The bus's users and permissions per role (services/voicestack/bus_permissions.py). The model is
files/nats-permissions.json, that module's output (`python -m voicestack.bus_permissions --json`;
tests/test_chart_nats.py keeps them equal). Each stage's pod connects as its own user (its
component name: edge, vad, stt, llm, llm-strong, tts) with its password file from the Secret
("voicestack.nats.authSecret"), mounted alone: a pod never holds another role's password.
*/}}

{{- define "voicestack.nats.model" -}}
{{- .Files.Get "files/nats-permissions.json" }}
{{- end }}

{{/*
"true" when the stages connect as their roles' users: nats.auth.enabled, no .creds file instead, and
passwords to use: nats.auth.existingSecret, or the Secret the chart makes for its own server
(nats.install; the only Secret the chart ever renders). Otherwise they connect as before, with no user.
*/}}
{{- define "voicestack.nats.authOn" -}}
{{- if and .Values.nats.auth.enabled (not .Values.nats.credentials.secretName) (or .Values.nats.auth.existingSecret .Values.nats.install.enabled) }}true{{- end }}
{{- end }}

{{- define "voicestack.nats.authSecret" -}}
{{- .Values.nats.auth.existingSecret | default (printf "%s-nats-users" (include "voicestack.fullname" .)) }}
{{- end }}

{{- define "voicestack.nats.serverName" -}}
{{- printf "%s-nats" (include "voicestack.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The URL the services connect to: the bundled server's Service when nats.install.enabled, else nats.url. */}}
{{- define "voicestack.nats.url" -}}
{{- if .Values.nats.install.enabled }}
{{- printf "%s://%s.%s.svc:4222" (ternary "tls" "nats" (not (empty .Values.nats.install.tlsSecretName))) (include "voicestack.nats.serverName" .) .Release.Namespace }}
{{- else }}
{{- .Values.nats.url }}
{{- end }}
{{- end }}

{{/*
The nats-server config block of accounts, users and permissions: exactly the text of
bus_permissions.server_config() (the test compares them). No secret: each password is a
$VARIABLE the server reads from its environment.
*/}}
{{- define "voicestack.nats.permissionsConfig" -}}
{{- $model := include "voicestack.nats.model" . | fromJson -}}
{{- $deployed := include "voicestack.nats.roles" . | fromJsonArray -}}
# voicestack: one NATS user per role, allow lists only (voicestack/bus_permissions.py)
accounts: {
  {{ $model.account }}: {
    users: [
{{- range $model.roles }}
{{- if has .role $deployed }}
      {user: {{ .role | toRawJson }}, password: ${{ .passwordVariable }}, permissions: {{ dict "publish" (dict "allow" .publish) "subscribe" (dict "allow" .subscribe) | toRawJson }}}
{{- end }}
{{- end }}
    ]
  }
}
{{ end -}}

{{/* A stage container's NATS user and password file (call with the stage context). */}}
{{- define "voicestack.nats.env" -}}
{{- if include "voicestack.nats.authOn" .root }}
- name: VOICESTACK_NATS_USER
  value: {{ .name | quote }}
- name: VOICESTACK_NATS_PASSWORD_FILE
  value: /etc/voicestack/nats-auth/password
{{- end }}
{{- end }}

{{/* The NATS server peers a stage's NetworkPolicy lets it reach: the bundled server, or networkPolicy.nats. */}}
{{- define "voicestack.nats.peer" -}}
{{- if .Values.nats.install.enabled -}}
{podSelector: {matchLabels: {app.kubernetes.io/instance: {{ .Release.Name }}, app.kubernetes.io/component: nats}}}
{{- else -}}
{{ toYaml .Values.networkPolicy.nats | indent 10 | trim }}
{{- end }}
{{- end }}

{{/*
The roles this release has users for, as a JSON list: the stages it deploys (their components:
edge, vad, stt, llm, llm-strong, tts) and status. A pool that is off (llmStrong) has no user.
*/}}
{{- define "voicestack.nats.roles" -}}
{{- $roles := list }}
{{- range $key := include "voicestack.stageNames" . | fromJsonArray }}
{{- $ctx := dict "root" $ "key" $key }}
{{- include "voicestack.stage.context" $ctx }}
{{- if $ctx.stage.enabled }}{{ $roles = append $roles $ctx.name }}{{ end }}
{{- end }}
{{- toRawJson (append $roles "status") }}
{{- end }}

{{/* The deployed roles that are services (all but status), as a JSON list: the pods that connect to the bus. */}}
{{- define "voicestack.nats.serviceRoles" -}}
{{- toRawJson (without (include "voicestack.nats.roles" . | fromJsonArray) "status") }}
{{- end }}

{{/* The bundled server's nats.conf (nats.install). */}}
{{- define "voicestack.nats.serverConfig" -}}
{{- $name := include "voicestack.nats.serverName" . -}}
{{- $inst := .Values.nats.install -}}
# The bundled NATS server (nats.install). Users and permissions: permissions.conf.
port: 4222
http_port: 8222
server_name: $POD_NAME
pid_file: "/var/run/nats/nats.pid"
lame_duck_duration: "30s"
lame_duck_grace_period: "10s"
{{- if $inst.tlsSecretName }}
tls {
  cert_file: "/etc/nats-tls/tls.crt"
  key_file: "/etc/nats-tls/tls.key"
}
{{- end }}
{{- if gt (int $inst.replicas) 1 }}
cluster {
  name: {{ $name | quote }}
  port: 6222
  routes: [
{{- range $i := until (int $inst.replicas) }}
    "nats://{{ $name }}-{{ $i }}.{{ $name }}-headless.{{ $.Release.Namespace }}.svc:6222"
{{- end }}
  ]
}
{{- end }}
{{- if include "voicestack.nats.authOn" . }}
include "permissions.conf"
{{- end }}
{{ end -}}

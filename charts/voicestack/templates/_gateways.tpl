{{/*
The gateways (gateways.web, gateways.sip): Converse clients of the edge that browsers (WebRTC) and
phones (SIP) talk to. Their templates (gateway-*.yaml) range over "voicestack.gatewayNames" and
complete each context with "voicestack.gateway.context"; the context has the shape of a stage's
(root, key, name, stage), so the stage helpers for names, labels, image, drain and the autoscaler's
behavior serve them too.
*/}}

{{- define "voicestack.gatewayNames" -}}
["web", "sip"]
{{- end }}

{{/* Completes a gateway context in place: (dict "root" $ "key" "web"|"sip") gets stage, name and service. */}}
{{- define "voicestack.gateway.context" -}}
{{- $_ := set . "stage" (index (.root.Values.gateways | default dict) .key | default dict) }}
{{- $_ := set . "name" .key }}
{{- $_ := set . "service" .key }}
{{- end }}

{{/* "true" when this gateway is deployed. */}}
{{- define "voicestack.gateway.enabled" -}}
{{- if .stage.enabled }}true{{ end }}
{{- end }}

{{/* The edge's gRPC address: gateways.<key>.edgeAddress, else this release's edge Service. */}}
{{- define "voicestack.gateway.edgeAddress" -}}
{{- $root := .root }}
{{- if .stage.edgeAddress }}{{ .stage.edgeAddress }}
{{- else if $root.Values.stages.edge.enabled }}
{{- printf "%s.%s.svc:50051" (include "voicestack.stage.fullname" (dict "root" $root "name" "edge")) $root.Release.Namespace }}
{{- else }}
{{- fail (printf "gateways.%s.enabled is true but stages.edge.enabled is false: set gateways.%s.edgeAddress (host:port of an edge's gRPC port)" .key .key) }}
{{- end }}
{{- end }}

{{/* "true" when the gateway talks TLS to this release's edge (the CA comes from the edge's TLS Secret). */}}
{{- define "voicestack.gateway.edgeTls" -}}
{{- if and (not .stage.edgeAddress) .root.Values.stages.edge.tls.secretName }}true{{ end }}
{{- end }}

{{/* The SIP gateway's RTP range as a list of port numbers (JSON), checked against its capacity. */}}
{{- define "voicestack.gateway.rtpPorts" -}}
{{- $r := .stage.rtpPorts }}
{{- $start := int $r.start }}
{{- $end := int $r.end }}
{{- if le $end $start }}
{{- fail (printf "gateways.sip.rtpPorts: end (%d) must be above start (%d)" $end $start) }}
{{- end }}
{{- $count := add (sub $end $start) 1 }}
{{- if gt $count 200 }}
{{- fail (printf "gateways.sip.rtpPorts %d-%d is %d ports: at most 200 (each is listed in the Service and the pod; cloud load balancers limit listeners)" $start $end $count) }}
{{- end }}
{{- $pairs := div $count 2 }}
{{- if gt (int .stage.capacity) $pairs }}
{{- fail (printf "gateways.sip.capacity (%d) is more calls than gateways.sip.rtpPorts %d-%d holds (%d: one even/odd pair per call): widen the range or lower the capacity" (int .stage.capacity) $start $end $pairs) }}
{{- end }}
{{- untilStep $start (add $end 1 | int) 1 | toJson }}
{{- end }}

{{/* Fails the render on a gateway that could not work: what the process or the edge would refuse. */}}
{{- define "voicestack.gateway.validate" -}}
{{- $s := .stage }}
{{- if and .root.Values.stages.edge.apiKeys.secretName (not $s.edgeAddress) (not ($s.edgeApiKeySecret | default dict).name) }}
{{- fail (printf "gateways.%s.edgeApiKeySecret is empty but the edge requires API keys (stages.edge.apiKeys.secretName): set it to {name, key} of an existing Secret holding one raw key" .key) }}
{{- end }}
{{- if eq .key "sip" }}
{{- if not (trim ($s.publicHost | default "")) }}
{{- fail "gateways.sip.enabled is true but gateways.sip.publicHost is empty: set the address callers reach (the LoadBalancer's IP or DNS name), or \"$(HOST_IP)\" (the node's address) with gateways.sip.hostNetwork" }}
{{- end }}
{{- if and (eq ($s.auth.username | default "") "") ($s.auth.passwordSecret | default dict).name }}
{{- fail "gateways.sip.auth.passwordSecret is set but gateways.sip.auth.username is empty: set both (or neither)" }}
{{- end }}
{{- if and $s.auth.username (not ($s.auth.passwordSecret | default dict).name) }}
{{- fail "gateways.sip.auth.username is set but gateways.sip.auth.passwordSecret is empty: set {name, key} of an existing Secret holding the password" }}
{{- end }}
{{- $_ := include "voicestack.gateway.rtpPorts" . }}
{{- end }}
{{- end }}

{{/* The SIP gateway's readiness/liveness/startup check: TCP connect with tcp on, else an OPTIONS over UDP. */}}
{{- define "voicestack.gateway.probe" -}}
{{- $s := .ctx.stage }}
{{- if eq .ctx.key "web" -}}
httpGet:
  path: /healthz
  port: http
  scheme: {{ ternary "HTTPS" "HTTP" (not (empty $s.tls.secretName)) }}
{{- else if has "tcp" $s.transports -}}
# A TCP connect to the SIP port (the gateway answers OPTIONS too, but kubelet speaks no SIP).
tcpSocket:
  port: sip-tcp
{{- else -}}
# UDP only: kubelet has no UDP probe, so send an OPTIONS from inside the pod; 200 = serving (503 while draining).
exec:
  command:
    - python
    - -c
    - |
      import os, socket, sys
      s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
      m = ("OPTIONS sip:probe@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK" + os.urandom(6).hex() + ";rport\r\n"
           "Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=probe\r\nTo: <sip:probe@127.0.0.1>\r\n"
           "Call-ID: probe-" + os.urandom(6).hex() + "\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
      s.sendto(m.encode(), ("127.0.0.1", {{ int $s.port }}))
      sys.exit(0 if s.recv(4096).startswith(b"SIP/2.0 200") else 1)
{{- end }}
periodSeconds: {{ .probe.periodSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
{{- end }}

{{/* Environment of a gateway container: the web_* / sip_* settings of services/voicestack/config.py. */}}
{{- define "voicestack.gateway.env" -}}
{{- $root := .root }}
{{- $s := .stage -}}
- name: HOME
  value: /tmp
- name: VOICESTACK_DRAIN_SECONDS
  value: {{ include "voicestack.stage.drainSeconds" . | quote }}
# Prometheus metrics (voicestack_streams_active / _capacity{stage="web"|"sip"}), on the listener's host (0.0.0.0).
- name: VOICESTACK_METRICS_PORT
  value: "9464"
{{- with ($s.edgeApiKeySecret | default dict) }}{{ if .name }}
# The edge's API key: from the Secret only (never a value, a flag or the page).
- name: VOICESTACK_API_KEY
  valueFrom: {secretKeyRef: {name: {{ .name | quote }}, key: {{ .key | quote }}}}
{{- end }}{{ end }}
{{- $edgeCa := printf "/etc/voicestack/edge-ca/%s" $root.Values.stages.edge.tls.caKey }}
{{- if eq .key "web" }}
- name: VOICESTACK_WEB_HOST
  value: "0.0.0.0"
- name: VOICESTACK_WEB_PORT
  value: {{ $s.port | quote }}
- name: VOICESTACK_WEB_EDGE_ADDRESS
  value: {{ include "voicestack.gateway.edgeAddress" . | quote }}
{{- if include "voicestack.gateway.edgeTls" . }}
- name: VOICESTACK_WEB_EDGE_CA_FILE
  value: {{ $edgeCa | quote }}
{{- end }}
{{- if $s.tls.secretName }}
- name: VOICESTACK_WEB_TLS_CERT_FILE
  value: /etc/voicestack/tls/tls.crt
- name: VOICESTACK_WEB_TLS_KEY_FILE
  value: /etc/voicestack/tls/tls.key
{{- end }}
- name: VOICESTACK_WEB_CAPACITY
  value: {{ $s.capacity | quote }}
- name: VOICESTACK_WEB_TOKEN_TTL_SECONDS
  value: {{ $s.tokenTtlSeconds | toString | quote }}
- name: VOICESTACK_WEB_ICE_SERVERS
  value: {{ join "," $s.iceServers | quote }}
- name: VOICESTACK_WEB_ALLOWED_ORIGINS
  value: {{ join "," $s.allowedOrigins | quote }}
{{- else }}
# The node's address: gateways.sip.publicHost may be "$(HOST_IP)" (with hostNetwork).
- name: HOST_IP
  valueFrom: {fieldRef: {fieldPath: status.hostIP}}
- name: VOICESTACK_SIP_HOST
  value: "0.0.0.0"
- name: VOICESTACK_SIP_PORT
  value: {{ $s.port | quote }}
- name: VOICESTACK_SIP_TRANSPORTS
  value: {{ join "," $s.transports | quote }}
- name: VOICESTACK_SIP_PUBLIC_HOST
  value: {{ $s.publicHost | trim | quote }}
- name: VOICESTACK_SIP_EDGE_ADDRESS
  value: {{ include "voicestack.gateway.edgeAddress" . | quote }}
{{- if include "voicestack.gateway.edgeTls" . }}
- name: VOICESTACK_SIP_EDGE_CA_FILE
  value: {{ $edgeCa | quote }}
{{- end }}
- name: VOICESTACK_SIP_RTP_PORTS
  value: "{{ $s.rtpPorts.start }}-{{ $s.rtpPorts.end }}"
- name: VOICESTACK_SIP_CAPACITY
  value: {{ $s.capacity | quote }}
- name: VOICESTACK_SIP_BUSY_CODE
  value: {{ $s.busyCode | quote }}
{{- if $s.auth.username }}
- name: VOICESTACK_SIP_USERNAME
  value: {{ $s.auth.username | quote }}
- name: VOICESTACK_SIP_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ $s.auth.passwordSecret.name | quote }}, key: {{ $s.auth.passwordSecret.key | quote }}}}
{{- end }}
- name: VOICESTACK_SIP_REALM
  value: {{ $s.auth.realm | quote }}
- name: VOICESTACK_SIP_RTP_TIMEOUT_SECONDS
  value: {{ $s.rtpTimeoutSeconds | toString | quote }}
- name: VOICESTACK_SIP_ANSWER_TIMEOUT_SECONDS
  value: {{ $s.answerTimeoutSeconds | toString | quote }}
{{- with $s.session }}
{{- with .systemPrompt }}
- name: VOICESTACK_SIP_SYSTEM_PROMPT
  value: {{ . | quote }}
{{- end }}
{{- with .greeting }}
- name: VOICESTACK_SIP_GREETING
  value: {{ . | quote }}
{{- end }}
{{- with .voice }}
- name: VOICESTACK_SIP_VOICE
  value: {{ . | quote }}
{{- end }}
- name: VOICESTACK_SIP_END_CALL
  value: {{ .endCall | toString | quote }}
{{- end }}
{{- end }}
{{- range $k, $v := $s.env }}
- name: {{ $k }}
  value: {{ $v | toString | quote }}
{{- end }}
{{- with $s.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

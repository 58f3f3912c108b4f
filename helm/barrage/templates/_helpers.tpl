{{/* Name of the release's objects. */}}
{{- define "barrage.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "barrage.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "controller"). */}}
{{- define "barrage.selector" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "barrage.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "barrage.etcdEndpoints" -}}
{{- if .Values.etcd.endpoints -}}
{{ .Values.etcd.endpoints }}
{{- else -}}
http://{{ include "barrage.fullname" . }}-etcd:2379
{{- end -}}
{{- end -}}

{{/* Environment every role shares. */}}
{{- define "barrage.commonEnv" -}}
- name: ETCD_ENDPOINTS
  value: {{ include "barrage.etcdEndpoints" . | quote }}
- name: ETCD_PREFIX
  value: {{ .Values.etcd.prefix | quote }}
- name: LEASE_TTL_SECS
  value: {{ .Values.leaseTtlSecs | quote }}
- name: LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
- name: TRANSPARENT_HUGE_PAGES
  value: {{ .Values.transparentHugePages | quote }}
- name: BIND_ADDR
  value: "0.0.0.0"
- name: ADVERTISE_HOST
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- with .Values.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- if .Values.tls.grpc.secretName }}
- name: GRPC_TLS_CERT_FILE
  value: /etc/barrage/grpc-tls/tls.crt
- name: GRPC_TLS_KEY_FILE
  value: /etc/barrage/grpc-tls/tls.key
- name: GRPC_TLS_CA_FILE
  value: /etc/barrage/grpc-tls/ca.crt
- name: GRPC_TLS_SERVER_NAME
  value: {{ .Values.tls.grpc.serverName | quote }}
{{- end }}
{{- end -}}

{{/* Secret holding the chart-managed auth material. */}}
{{/* The async runtime of one role: its flavor, and its worker threads when set. */}}
{{- define "barrage.runtimeEnv" -}}
- name: RUNTIME_FLAVOR
  value: {{ .runtimeFlavor | quote }}
{{- with .workerThreads }}
- name: TOKIO_WORKER_THREADS
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{- define "barrage.authSecretName" -}}
{{ include "barrage.fullname" . }}-auth
{{- end -}}

{{/* Which JWT keys exist: a dict of hs256/publicKey/jwks to bool, and the Secret name. */}}
{{- define "barrage.jwtKeys" -}}
{{- $j := .Values.auth.jwt -}}
{{- if $j.existingSecret -}}
{{- toJson (dict "secret" $j.existingSecret "hs256" (has "hs256-secret" $j.existingSecretKeys) "publicKey" (has "public-key.pem" $j.existingSecretKeys) "jwks" (has "jwks.json" $j.existingSecretKeys)) -}}
{{- else -}}
{{- toJson (dict "secret" (include "barrage.authSecretName" .) "hs256" (ne $j.hs256Secret "") "publicKey" (ne $j.publicKeyPem "") "jwks" (ne $j.jwks "")) -}}
{{- end -}}
{{- end -}}

{{/* Volume and mount of the gRPC TLS Secret (call with the root context). */}}
{{- define "barrage.grpcTlsMount" -}}
{{- if .Values.tls.grpc.secretName }}
- {name: grpc-tls, mountPath: /etc/barrage/grpc-tls, readOnly: true}
{{- end }}
{{- end -}}
{{- define "barrage.grpcTlsVolume" -}}
{{- if .Values.tls.grpc.secretName }}
- name: grpc-tls
  secret: {secretName: {{ .Values.tls.grpc.secretName | quote }}}
{{- end }}
{{- end -}}

{{/* Probes on the role's HTTP port. */}}
{{- define "barrage.probes" -}}
livenessProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: metrics}
  periodSeconds: 5
  failureThreshold: 2
startupProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 2
  failureThreshold: 30
{{- end -}}

{{- define "barrage.podSpecCommon" -}}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .ctx.Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ .role.terminationGracePeriodSeconds }}
{{- with .role.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
The preStop sleep of a role that drains (`role`: its values, `name`: its
key in values.yaml): Services and load balancers stop sending it new
connections and calls while it still serves, then SIGTERM starts the
drain. The grace period must outlast the sleep, or the pod is killed
before it drains.
*/}}
{{- define "barrage.preStop" -}}
{{- $sleep := int .role.preStopSleepSecs -}}
{{- $grace := int .role.terminationGracePeriodSeconds -}}
{{- if and (gt $sleep 0) (le $grace $sleep) -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must be above %s.preStopSleepSecs (%d): the pod would be killed before it drains" .name $grace .name $sleep) -}}
{{- end -}}
lifecycle:
  preStop:
    exec:
      command: ["sleep", "{{ $sleep }}"]
{{- end -}}

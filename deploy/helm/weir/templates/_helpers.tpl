{{/* Names: <release>-weir unless the release already says weir; each component adds its own suffix. */}}
{{- define "weir.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "weir.serverName" -}}{{ include "weir.fullname" . }}-server{{- end -}}
{{- define "weir.gatewayName" -}}{{ include "weir.fullname" . }}-gateway{{- end -}}

{{- define "weir.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: weir
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "component" "server"). */}}
{{- define "weir.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "weir.componentLabels" -}}
{{ include "weir.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "weir.serverImage" -}}
{{- $tag := .Values.image.server.tag | default (ternary "cuda" "cpu" .Values.gpu.enabled) -}}
{{- printf "%s:%s" .Values.image.server.repository $tag -}}
{{- end -}}

{{/* The Secret holding the API keys, or nothing when keys are off. */}}
{{- define "weir.apiKeySecret" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- .Values.apiKeys.existingSecret -}}
{{- else if .Values.apiKeys.create -}}
{{- include "weir.fullname" . }}-api-keys
{{- end -}}
{{- end -}}

{{/* OpenTelemetry export of one service: call with (dict "root" $ "service" "weir-server") when otel.endpoint is set. */}}
{{- define "weir.otelEnv" -}}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .root.Values.otel.endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .service }}
{{- end -}}

{{/* Names, labels and the pieces every pod shares. */}}

{{- define "flywheel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "flywheel.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "flywheel.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "flywheel.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels beyond the selector's, for pod templates. */}}
{{- define "flywheel.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "flywheel.labels" -}}
{{ include "flywheel.commonLabels" . }}
app.kubernetes.io/name: {{ include "flywheel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels for one component: api, scheduler, worker-<pool>, embedded. */}}
{{- define "flywheel.selector" -}}
app.kubernetes.io/name: {{ include "flywheel.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "flywheel.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* A worker pool's image: the chart's, with the pool's repository, tag and tag suffix. */}}
{{- define "flywheel.poolImage" -}}
{{- $image := default dict .pool.image -}}
{{- $tag := default (default .root.Chart.AppVersion .root.Values.image.tag) $image.tag -}}
{{ default .root.Values.image.repository $image.repository }}:{{ $tag }}{{ $image.tagSuffix }}
{{- end -}}

{{- define "flywheel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "flywheel.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Distributed when the database lives outside the pod. */}}
{{- define "flywheel.distributed" -}}
{{- if or .Values.database.url .Values.database.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "flywheel.secretName" -}}
{{- include "flywheel.fullname" . -}}
{{- end -}}

{{- define "flywheel.databaseSecret" -}}
{{- default (include "flywheel.secretName" .) .Values.database.existingSecret -}}
{{- end -}}

{{/* Environment every flywheel container gets. */}}
{{- define "flywheel.env" -}}
- name: FLYWHEEL_DATABASE
  valueFrom:
    secretKeyRef:
      name: {{ include "flywheel.databaseSecret" . }}
      key: FLYWHEEL_DATABASE
- name: FLYWHEEL_BOOTSTRAP_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      {{- if .Values.auth.existingSecret }}
      name: {{ .Values.auth.existingSecret }}
      key: {{ .Values.auth.existingSecretKey }}
      {{- else }}
      name: {{ include "flywheel.secretName" . }}
      key: FLYWHEEL_BOOTSTRAP_ADMIN_TOKEN
      {{- end }}
- name: FLYWHEEL_WEBHOOK_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .Values.notifications.existingSecret | default (include "flywheel.secretName" .) }}
      key: FLYWHEEL_WEBHOOK_SECRET
{{- with .Values.registry.credentials }}
{{- if not .existingSecret }}
{{- range $key, $name := dict "accessKeyId" "AWS_ACCESS_KEY_ID" "secretAccessKey" "AWS_SECRET_ACCESS_KEY" "googleServiceAccountKey" "GOOGLE_SERVICE_ACCOUNT_KEY" "azureStorageAccountName" "AZURE_STORAGE_ACCOUNT_NAME" "azureStorageAccountKey" "AZURE_STORAGE_ACCOUNT_KEY" }}
{{- if index $.Values.registry.credentials $key }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "flywheel.secretName" $ }}
      key: {{ $name }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "flywheel.container" -}}
image: {{ include "flywheel.image" . }}
{{ include "flywheel.containerCommon" . }}
{{- end -}}

{{/* A flywheel container but its image. */}}
{{- define "flywheel.containerCommon" -}}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
envFrom:
  - configMapRef:
      name: {{ include "flywheel.fullname" . }}
  {{- with .Values.serving.teacherKeysSecret }}
  - secretRef:
      name: {{ . }}
  {{- end }}
  {{- with .Values.registry.credentials.existingSecret }}
  # The store's credentials, whatever the store: every key becomes a variable.
  - secretRef:
      name: {{ . }}
  {{- end }}
  {{- with .Values.envFrom }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{- define "flywheel.probes" -}}
ports:
  - name: http
    containerPort: 8080
    protocol: TCP
# Liveness asks only that the process answers; readiness that the database does, so a
# database outage takes pods out of the Service without restarting training.
livenessProbe:
  httpGet: {path: /livez, port: http}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
readinessProbe:
  httpGet: {path: /healthz, port: http}
  periodSeconds: 5
  timeoutSeconds: 3
startupProbe:
  httpGet: {path: /healthz, port: http}
  periodSeconds: 2
  failureThreshold: 60
{{- end -}}

{{- define "flywheel.podSpecCommon" -}}
serviceAccountName: {{ include "flywheel.serviceAccountName" . }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Scratch space for work directories and the model cache; the root filesystem is read-only. */}}
{{- define "flywheel.scratchVolume" -}}
- name: data
  emptyDir:
    sizeLimit: {{ .Values.scratch.sizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSizeLimit }}
{{- end -}}

{{- define "flywheel.mounts" -}}
- name: data
  mountPath: /var/lib/flywheel
- name: tmp
  mountPath: /tmp
{{- end -}}

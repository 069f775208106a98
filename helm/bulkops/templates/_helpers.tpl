{{/*
Expand the name of the chart.
*/}}
{{- define "bulkops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "bulkops.fullname" -}}
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

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "bulkops.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "bulkops.labels" -}}
helm.sh/chart: {{ include "bulkops.chart" . }}
{{ include "bulkops.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: bulkops
{{- end }}

{{/*
Selector labels
*/}}
{{- define "bulkops.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bulkops.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name, labels and selector labels of one component (producer, worker, migrate).
Called with (dict "root" $ "component" "producer").
*/}}
{{- define "bulkops.componentName" -}}
{{- printf "%s-%s" (include "bulkops.fullname" .root | trunc 52 | trimSuffix "-") .component }}
{{- end }}

{{- define "bulkops.componentLabels" -}}
{{ include "bulkops.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "bulkops.componentSelectorLabels" -}}
{{ include "bulkops.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "bulkops.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "bulkops.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret holding database-url, amqp-url, redis-url and jwt-secret: the operator's
existingSecret, or the one this chart creates from .Values.secrets.
*/}}
{{- define "bulkops.secretName" -}}
{{- if .Values.existingSecret }}
{{- .Values.existingSecret }}
{{- else }}
{{- include "bulkops.fullname" . }}
{{- end }}
{{- end }}

{{/*
The Secret keys and the environment variables they become (CONTRACT section 5).
*/}}
{{- define "bulkops.secretEnvNames" -}}
database-url: BULKOPS__DATABASE__URL
amqp-url: BULKOPS__AMQP__URL
amqp-urls: BULKOPS__AMQP__URLS
redis-url: BULKOPS__REDIS__URL
redis-nodes: BULKOPS__REDIS__NODES
jwt-secret: BULKOPS__AUTH__JWT_SECRET
operator-jwt-secret: BULKOPS__AUTH__OPERATOR_JWT_SECRET
{{- end }}

{{/*
The Secret keys through which a program reaches Redis, by config.redis.mode, as a YAML
list: standalone, redis-url; cluster, redis-nodes; sentinel, redis-nodes and (when given)
redis-url for the master's password and database. Keys in "optional" may be missing from
an existingSecret.
*/}}
{{- define "bulkops.redisSecretKeys" -}}
{{- $mode := .Values.config.redis.mode | default "standalone" }}
{{- if eq $mode "standalone" }}
required: [redis-url]
optional: []
{{- else if eq $mode "cluster" }}
required: [redis-nodes]
optional: []
{{- else if .Values.existingSecret }}
required: [redis-nodes]
optional: [redis-url]
{{- else if .Values.secrets.redisUrl }}
required: [redis-nodes, redis-url]
optional: []
{{- else }}
required: [redis-nodes]
optional: []
{{- end }}
{{- end }}

{{/*
The secret keys a program needs (.keys, a list, with "redis" standing for the Redis keys
of the mode) and the ones it reads when present (the mode's optional Redis keys, and
amqp-urls beside amqp-url), as (dict "secretKeys" LIST "optionalSecretKeys" LIST).
Called with (dict "root" $ "keys" (list ...)).
*/}}
{{- define "bulkops.secretKeys" -}}
{{- $redis := include "bulkops.redisSecretKeys" .root | fromYaml }}
{{- $keys := list }}
{{- range .keys }}
{{- if eq . "redis" }}
{{- $keys = concat $keys $redis.required }}
{{- else }}
{{- $keys = append $keys . }}
{{- end }}
{{- end }}
{{- $optional := ternary $redis.optional (list) (has "redis" .keys) }}
{{- if has "amqp-url" .keys }}
{{- $optional = append $optional "amqp-urls" }}
{{- end }}
{{- toYaml (dict "secretKeys" $keys "optionalSecretKeys" $optional) }}
{{- end }}

{{/*
Environment of a bulkops container: BULKOPS_CONFIG, the secret keys it needs, those it reads
when the Secret has them (optionalSecretKeys: amqp-urls, which an existingSecret may lack),
the standard OTEL_* variables of .Values.telemetry when "traced" (the producer and worker, once
telemetry.otlpEndpoint is set), and its extra variables. Called with (dict "root" $ "secretName"
NAME "secretKeys" (list ...) "optionalSecretKeys" (list ...) "extraEnv" LIST "traced" BOOL).
*/}}
{{- define "bulkops.env" -}}
{{- $names := include "bulkops.secretEnvNames" . | fromYaml -}}
- name: BULKOPS_CONFIG
  value: /etc/bulkops/bulkops.toml
{{- range .secretKeys }}
- name: {{ get $names . }}
  valueFrom:
    secretKeyRef:
      name: {{ $.secretName }}
      key: {{ . }}
{{- end }}
{{- range .optionalSecretKeys }}
- name: {{ get $names . }}
  valueFrom:
    secretKeyRef:
      name: {{ $.secretName }}
      key: {{ . }}
      optional: true
{{- end }}
{{- $otel := .root.Values.telemetry | default dict }}
{{- if and .traced $otel.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $otel.otlpEndpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $otel.protocol | default "http/protobuf" | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $otel.sampler | default "parentbased_always_on" | quote }}
{{- with $otel.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- with $otel.resourceAttributes }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Image reference of a component. Called with (dict "root" $ "image" .Values.<component>.image).
*/}}
{{- define "bulkops.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion) }}
{{- end }}

{{/*
Listen ports, fixed by the chart (the ConfigMap sets http.bind and metrics.bind to them).
*/}}
{{- define "bulkops.producerPort" -}}8080{{- end }}
{{- define "bulkops.workerPort" -}}9090{{- end }}

{{/*
One TOML value: strings are JSON-quoted (valid TOML basic strings), whole numbers print
without a fraction (YAML numbers reach templates as float64), lists recurse.
*/}}
{{- define "bulkops.tomlValue" -}}
{{- if kindIs "slice" . -}}
[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "bulkops.tomlValue" $v }}{{ end }}]
{{- else if kindIs "string" . -}}
{{ toJson . }}
{{- else if and (kindIs "float64" .) (eq . (floor .)) -}}
{{ int64 . }}
{{- else -}}
{{ . }}
{{- end -}}
{{- end }}

{{/*
The TOML file named by BULKOPS_CONFIG: .Values.config plus the listen addresses.
Secrets never appear here; they come from the environment.
*/}}
{{- define "bulkops.configToml" -}}
{{- $config := deepCopy .Values.config }}
{{- $_ := set $config "http" (merge (dict "bind" (printf "0.0.0.0:%s" (include "bulkops.producerPort" .))) $config.http) }}
{{- $_ = set $config "metrics" (dict "bind" (printf "0.0.0.0:%s" (include "bulkops.workerPort" .))) -}}
# Rendered by the bulkops chart from .Values.config (keys: config/default.toml).
# Secrets come from the environment: BULKOPS__DATABASE__URL, BULKOPS__AMQP__URL(S),
# BULKOPS__REDIS__URL, BULKOPS__AUTH__JWT_SECRET (and BULKOPS__AUTH__OPERATOR_JWT_SECRET).
{{- range $section := keys $config | sortAlpha }}
{{- $values := get $config $section }}

[{{ $section }}]
{{- range $key := keys $values | sortAlpha }}
{{ $key }} = {{ include "bulkops.tomlValue" (get $values $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checks the schema cannot express: required secrets, and values that must agree. (The grace
periods are held above the 29 s drain limit by the schema.)
*/}}
{{- define "bulkops.validate" -}}
{{- if gt (int .Values.config.database.min_connections) (int .Values.config.database.max_connections) }}
{{- fail "config.database.min_connections must not exceed config.database.max_connections" }}
{{- end }}
{{- $redisMode := .Values.config.redis.mode | default "standalone" }}
{{- if not .Values.existingSecret }}
{{- range $key := list "databaseUrl" "amqpUrl" "redisUrl" "jwtSecret" }}
{{- if and (not (get $.Values.secrets $key)) (or (ne $key "redisUrl") (eq $redisMode "standalone")) (not (and (eq $key "amqpUrl") $.Values.secrets.amqpUrls)) }}
{{- fail (printf "secrets.%s is required unless existingSecret names a Secret with keys database-url, amqp-url, redis-url and jwt-secret" $key) }}
{{- end }}
{{- end }}
{{- if and (ne $redisMode "standalone") (not .Values.secrets.redisNodes) }}
{{- fail (printf "secrets.redisNodes must list the %s when config.redis.mode is %s" (ternary "seed nodes" "Sentinels" (eq $redisMode "cluster")) $redisMode) }}
{{- end }}
{{- if and (eq $redisMode "standalone") .Values.secrets.redisNodes }}
{{- fail "secrets.redisNodes is set but config.redis.mode is standalone: set config.redis.mode to cluster or sentinel" }}
{{- end }}
{{- if and (.Values.config.ui).enabled (not .Values.secrets.operatorJwtSecret) }}
{{- fail "secrets.operatorJwtSecret is required when config.ui.enabled is true (or name an existingSecret with the key operator-jwt-secret)" }}
{{- end }}
{{- if and .Values.secrets.operatorJwtSecret (eq .Values.secrets.operatorJwtSecret .Values.secrets.jwtSecret) }}
{{- fail "secrets.operatorJwtSecret must differ from secrets.jwtSecret (a CRM token must never be an operator's)" }}
{{- end }}
{{- end }}
{{- if and .Values.worker.keda.enabled (not .Values.worker.keda.prometheus.serverAddress) }}
{{- fail "worker.keda.prometheus.serverAddress is required when worker.keda.enabled: KEDA scales on bulkops_lane_backlog_items through Prometheus" }}
{{- end }}
{{- end }}

{{/*
The pod template of every bulkops workload (producer, worker, migration Job).
Called with a dict:
  root        the chart's root context ($)
  component   producer | worker | migrate
  values      the component's values (.Values.producer, ...)
  configName  the ConfigMap holding bulkops.toml
  secretName  the Secret holding the secret keys
  secretKeys  the secret keys the program needs
  optionalSecretKeys (optional) secret keys it reads when present
  port        (optional) dict with name and number of the container port
  args        (optional) container arguments
  restartPolicy (optional) for Jobs
*/}}
{{- define "bulkops.podTemplate" -}}
{{- $root := .root }}
{{- $v := .values -}}
metadata:
  annotations:
    checksum/config: {{ include "bulkops.configToml" $root | sha256sum }}
    {{- if not $root.Values.existingSecret }}
    checksum/secret: {{ toJson $root.Values.secrets | sha256sum }}
    {{- end }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  labels:
    {{- include "bulkops.componentLabels" (dict "root" $root "component" .component) | nindent 4 }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .serviceAccountName }}
  serviceAccountName: {{ .serviceAccountName }}
  {{- end }}
  automountServiceAccountToken: {{ $root.Values.serviceAccount.automount }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with .restartPolicy }}
  restartPolicy: {{ . }}
  {{- end }}
  {{- with $v.terminationGracePeriodSeconds }}
  terminationGracePeriodSeconds: {{ . }}
  {{- end }}
  containers:
    - name: {{ .component }}
      image: {{ include "bulkops.image" (dict "root" $root "image" $v.image) | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- with .args }}
      args:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .port }}
      ports:
        - name: {{ .name }}
          containerPort: {{ .number }}
          protocol: TCP
      {{- end }}
      env:
        {{- include "bulkops.env" (dict "root" $root "secretName" .secretName "secretKeys" .secretKeys "optionalSecretKeys" (default (list) .optionalSecretKeys) "extraEnv" $v.extraEnv "traced" .traced) | nindent 8 }}
      {{- with $v.livenessProbe }}
      livenessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.readinessProbe }}
      readinessProbe:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml $v.resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/bulkops
          readOnly: true
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: config
      configMap:
        name: {{ .configName }}
    # The root filesystem is read-only; /tmp is the only writable place.
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

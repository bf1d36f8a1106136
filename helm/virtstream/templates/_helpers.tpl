{{/*
Chart name, truncated to the 63 characters a label value allows.
*/}}
{{- define "virtstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name when it already contains
the chart name; fullnameOverride wins.
*/}}
{{- define "virtstream.fullname" -}}
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
chart label value: <name>-<version>.
*/}}
{{- define "virtstream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels of the agent's resources.
*/}}
{{- define "virtstream.labels" -}}
{{ include "virtstream.commonLabels" . }}
app.kubernetes.io/component: agent
{{- end }}

{{/*
Standard labels without the component.
*/}}
{{- define "virtstream.commonLabels" -}}
helm.sh/chart: {{ include "virtstream.chart" . }}
{{ include "virtstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/part-of: virtstream
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels the DaemonSet selects its pods by (immutable once installed).
*/}}
{{- define "virtstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "virtstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "virtstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "virtstream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: repository@digest, else repository:tag (tag defaults to
the appVersion).
*/}}
{{- define "virtstream.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Where the referenced Secrets are mounted, one directory per sink (and one for the schema registry). */}}
{{- define "virtstream.secretDir" -}}
/etc/virtstream/secrets/{{ . }}
{{- end }}

{{/*
The Secret files of the NATS sink as a JSON list of
{secret, key, file, configKey}: each is mounted at
/etc/virtstream/secrets/nats/<file> and named by [nats] <configKey>.
*/}}
{{- define "virtstream.natsSecretFiles" -}}
{{- $n := .Values.nats }}
{{- $f := list }}
{{- if $n.enabled }}
{{- with $n.auth.credentials }}{{ if .secretName }}{{ $f = append $f (dict "secret" .secretName "key" .key "file" "nats.creds" "configKey" "credentials_file") }}{{ end }}{{ end }}
{{- with $n.auth.token }}{{ if .secretName }}{{ $f = append $f (dict "secret" .secretName "key" .key "file" "token" "configKey" "token_file") }}{{ end }}{{ end }}
{{- with $n.auth.nkeySeed }}{{ if .secretName }}{{ $f = append $f (dict "secret" .secretName "key" .key "file" "nkey.seed" "configKey" "nkey_seed_file") }}{{ end }}{{ end }}
{{- with $n.auth.password }}{{ if and .secretName (not .fromEnv) }}{{ $f = append $f (dict "secret" .secretName "key" .key "file" "password" "configKey" "password_file") }}{{ end }}{{ end }}
{{- with $n.tls.ca }}{{ if .secretName }}{{ $f = append $f (dict "secret" .secretName "key" .key "file" "ca.crt" "configKey" "tls_ca_file") }}{{ end }}{{ end }}
{{- with $n.tls.clientCert }}{{ if .secretName }}
{{- $f = append $f (dict "secret" .secretName "key" .certKey "file" "tls.crt" "configKey" "tls_cert_file") }}
{{- $f = append $f (dict "secret" .secretName "key" .keyKey "file" "tls.key" "configKey" "tls_key_file") }}
{{- end }}{{ end }}
{{- end }}
{{- toJson $f }}
{{- end }}

{{/*
The Secret files of the Kafka sink, as for NATS.
*/}}
{{- define "virtstream.kafkaSecretFiles" -}}
{{- $k := .Values.kafka }}
{{- $f := list }}
{{- if $k.enabled }}
{{- with $k.sasl.password }}{{ if and .secretName (not .fromEnv) }}{{ $f = append $f (dict "secret" .secretName "key" .key "file" "sasl-password" "configKey" "sasl_password_file") }}{{ end }}{{ end }}
{{- with $k.tls.ca }}{{ if .secretName }}{{ $f = append $f (dict "secret" .secretName "key" .key "file" "ca.crt" "configKey" "tls_ca_file") }}{{ end }}{{ end }}
{{- with $k.tls.clientCert }}{{ if .secretName }}
{{- $f = append $f (dict "secret" .secretName "key" .certKey "file" "tls.crt" "configKey" "tls_cert_file") }}
{{- $f = append $f (dict "secret" .secretName "key" .keyKey "file" "tls.key" "configKey" "tls_key_file") }}
{{- end }}{{ end }}
{{- with $k.tls.keyPassword }}{{ if .secretName }}{{ $f = append $f (dict "secret" .secretName "key" .key "file" "tls-key-password" "configKey" "tls_key_password_file") }}{{ end }}{{ end }}
{{- end }}
{{- toJson $f }}
{{- end }}

{{/*
The Secret files of the schema registry client, as for NATS, under
/etc/virtstream/secrets/schema-registry/ and named by [schema_registry].
*/}}
{{- define "virtstream.schemaRegistrySecretFiles" -}}
{{- $r := .Values.schemaRegistry }}
{{- $f := list }}
{{- if $r.enabled }}
{{- with $r.auth.password }}{{ if and .secretName (not .fromEnv) }}{{ $f = append $f (dict "secret" .secretName "key" .key "file" "password" "configKey" "password_file") }}{{ end }}{{ end }}
{{- with $r.tls.ca }}{{ if .secretName }}{{ $f = append $f (dict "secret" .secretName "key" .key "file" "ca.crt" "configKey" "tls_ca_file") }}{{ end }}{{ end }}
{{- with $r.tls.clientCert }}{{ if .secretName }}
{{- $f = append $f (dict "secret" .secretName "key" .certKey "file" "tls.crt" "configKey" "tls_cert_file") }}
{{- $f = append $f (dict "secret" .secretName "key" .keyKey "file" "tls.key" "configKey" "tls_key_file") }}
{{- end }}{{ end }}
{{- end }}
{{- toJson $f }}
{{- end }}

{{/*
Consistency checks the schema cannot express with a clear message; each
fails the render naming the values to fix. Included by the DaemonSet and
the ConfigMap.
*/}}
{{- define "virtstream.validate" -}}
{{- $v := .Values }}
{{- if not (or $v.nats.enabled $v.kafka.enabled) }}
{{- fail "virtstream: enable at least one sink (nats.enabled or kafka.enabled)" }}
{{- end }}
{{- $hp := trimSuffix "/" $v.journal.hostPath }}
{{- $jp := trimSuffix "/" $v.config.journal.path }}
{{- if not (or (eq $jp $hp) (hasPrefix (printf "%s/" $hp) $jp)) }}
{{- fail (printf "virtstream: config.journal.path (%s) must be inside journal.hostPath (%s): anywhere else the journal would not survive a pod restart" $v.config.journal.path $v.journal.hostPath) }}
{{- end }}
{{- if and (hasKey $v.config "usage") (not (kindIs "invalid" $v.config.usage)) }}
{{- fail "virtstream: config.usage is not rendered: [usage] is read only by the `virtstream usage --publish` tool, never by the agent; give that tool its own config file (docs/kubernetes.md)" }}
{{- end }}
{{- if $v.hooks.enabled }}
{{- $h := $v.hooks }}
{{- $lv := trimSuffix "/" $v.libvirt.hostRunDir }}
{{- range $key, $dir := dict "hooks.hostSocketDir" $h.hostSocketDir "hooks.hostSpoolDir" $h.hostSpoolDir }}
{{- if include "virtstream.overlaps" (list $dir $lv) }}
{{- fail (printf "virtstream: %s (%s) overlaps libvirt.hostRunDir (%s), which is mounted read-only: use a directory of its own" $key $dir $lv) }}
{{- end }}
{{- if and (ne $dir $hp) (include "virtstream.overlaps" (list $dir $hp)) }}
{{- fail (printf "virtstream: %s (%s) overlaps journal.hostPath (%s): use journal.hostPath itself or a directory outside it" $key $dir $hp) }}
{{- end }}
{{- end }}
{{- if $h.install }}
{{- range $key, $dir := dict "journal.hostPath" $hp "hooks.hostSocketDir" $h.hostSocketDir "hooks.hostSpoolDir" $h.hostSpoolDir "libvirt.hostRunDir" $lv }}
{{- if include "virtstream.overlaps" (list $h.hostBinDir $dir) }}
{{- fail (printf "virtstream: hooks.hostBinDir (%s) overlaps %s (%s): the binary libvirtd runs as root must be in a root-owned directory of its own (the agent's user owns the journal, socket and spool directories and could replace it), e.g. /opt/virtstream/bin" $h.hostBinDir $key $dir) }}
{{- end }}
{{- end }}
{{- if include "virtstream.overlaps" (list $h.hostBinDir "/etc/libvirt/hooks") }}
{{- fail (printf "virtstream: hooks.hostBinDir (%s) overlaps /etc/libvirt/hooks: libvirtd would run everything in it" $h.hostBinDir) }}
{{- end }}
{{- end }}
{{- end }}
{{- $psc := $v.podSecurityContext }}
{{- if and $psc.runAsNonRoot (eq (int (default 0 $psc.runAsUser)) 0) }}
{{- fail "virtstream: podSecurityContext.runAsNonRoot is true but runAsUser is 0 (or unset); set runAsUser (default 65532), or runAsNonRoot: false to run as root" }}
{{- end }}
{{- if $v.nats.enabled }}
{{- $a := $v.nats.auth }}
{{- $methods := 0 }}
{{- if $a.credentials.secretName }}{{ $methods = add1 $methods }}{{ end }}
{{- if $a.token.secretName }}{{ $methods = add1 $methods }}{{ end }}
{{- if $a.nkeySeed.secretName }}{{ $methods = add1 $methods }}{{ end }}
{{- if or $a.user $a.password.secretName }}{{ $methods = add1 $methods }}{{ end }}
{{- if gt $methods 1 }}
{{- fail "virtstream: nats.auth: set at most one of credentials, token, nkeySeed and user/password" }}
{{- end }}
{{- if and $a.user (not $a.password.secretName) }}
{{- fail "virtstream: nats.auth.user needs nats.auth.password.secretName" }}
{{- end }}
{{- if and $a.password.secretName (not $a.user) }}
{{- fail "virtstream: nats.auth.password needs nats.auth.user" }}
{{- end }}
{{- if and (not (or $v.nats.tls.enabled (hasPrefix "tls://" $v.nats.url))) (or $v.nats.tls.ca.secretName $v.nats.tls.clientCert.secretName) }}
{{- fail "virtstream: nats.tls.ca / nats.tls.clientCert are set but TLS is off (set nats.tls.enabled, or use a tls:// URL)" }}
{{- end }}
{{- end }}
{{- if $v.kafka.enabled }}
{{- $s := $v.kafka.sasl }}
{{- if $s.mechanism }}
{{- if not $s.username }}
{{- fail (printf "virtstream: kafka.sasl.username is required with kafka.sasl.mechanism %s" $s.mechanism) }}
{{- end }}
{{- if not $s.password.secretName }}
{{- fail (printf "virtstream: kafka.sasl.password.secretName is required with kafka.sasl.mechanism %s" $s.mechanism) }}
{{- end }}
{{- else if or $s.username $s.password.secretName }}
{{- fail "virtstream: kafka.sasl.username / kafka.sasl.password are set but kafka.sasl.mechanism is empty" }}
{{- end }}
{{- $t := $v.kafka.tls }}
{{- if and (not $t.enabled) (or $t.ca.secretName $t.clientCert.secretName $t.keyPassword.secretName) }}
{{- fail "virtstream: kafka.tls.ca / clientCert / keyPassword are set but kafka.tls.enabled is false" }}
{{- end }}
{{- if and $t.keyPassword.secretName (not $t.clientCert.secretName) }}
{{- fail "virtstream: kafka.tls.keyPassword needs kafka.tls.clientCert" }}
{{- end }}
{{- end }}
{{- $r := $v.schemaRegistry }}
{{- if $r.enabled }}
{{- if and $r.auth.username (not $r.auth.password.secretName) }}
{{- fail "virtstream: schemaRegistry.auth.username needs schemaRegistry.auth.password.secretName" }}
{{- end }}
{{- if and $r.auth.password.secretName (not $r.auth.username) }}
{{- fail "virtstream: schemaRegistry.auth.password needs schemaRegistry.auth.username" }}
{{- end }}
{{- if and (not (hasPrefix "https://" $r.url)) (or $r.tls.ca.secretName $r.tls.clientCert.secretName) }}
{{- fail "virtstream: schemaRegistry.tls.ca / schemaRegistry.tls.clientCert are set but schemaRegistry.url is not https://" }}
{{- end }}
{{- /* The registry framing is Avro only: an enabled sink it applies to
must not encode JSON (the agent would exit 64 at start). */}}
{{- $rc := default dict $v.config.schema_registry }}
{{- $sinks := list "kafka" "nats" }}
{{- if not (kindIs "invalid" (index $rc "sinks")) }}{{ $sinks = index $rc "sinks" }}{{ end }}
{{- range $sink := $sinks }}
{{- if and (index $v $sink "enabled") (eq (toString (index (default dict (index $v.config $sink)) "encoding")) "json") }}
{{- fail (printf "virtstream: config.%s.encoding is json, but the schema registry applies to the %s sink (config.schema_registry.sinks, default both) and its framing is Avro only: use encoding avro, or leave %s out of config.schema_registry.sinks" $sink $sink $sink) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when the directories (list A B) are equal or one is inside the other; "" otherwise. */}}
{{- define "virtstream.overlaps" -}}
{{- $a := trimSuffix "/" (index . 0) }}
{{- $b := trimSuffix "/" (index . 1) }}
{{- if or (eq $a $b) (hasPrefix (printf "%s/" $a) $b) (hasPrefix (printf "%s/" $b) $a) }}true{{ end }}
{{- end }}

{{/*
The hook script installed as /etc/libvirt/hooks/qemu.d/virtstream with
hooks.install: the agent's paths passed explicitly, and exit 0 even when
the binary is missing or cannot run (libvirt fails a guest's start or
migration on a hook's non-zero exit).
*/}}
{{- define "virtstream.hookScript" -}}
{{- $h := .Values.hooks -}}
#!/bin/sh
# Installed by the virtstream Helm chart (release {{ .Release.Name }}, namespace
# {{ .Release.Namespace }}): forwards libvirt's qemu hook calls to the node's
# virtstream agent, or to its spool while no agent listens.
{{ $h.hostBinDir }}/virtstream-hook --socket {{ $h.hostSocketDir }}/hooks.sock --spool {{ $h.hostSpoolDir }}/hooks.spool --spool-max-bytes {{ int64 $h.spoolMaxBytes }} -- qemu "$@" || true
exit 0
{{- end }}

{{/*
TOML rendering. Strings are written as JSON string literals (valid TOML
basic strings), numbers and booleans bare, lists as inline arrays, maps as
sub-tables; null values are left out (so `key: null` in values restores the
agent's default).
*/}}
{{- define "virtstream.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{- define "virtstream.toml.value" -}}
{{- if kindIs "slice" . -}}
[{{ range $i, $e := . }}{{ if $i }}, {{ end }}{{ include "virtstream.toml.value" $e }}{{ end }}]
{{- else if kindIs "string" . -}}
{{ toJson . }}
{{- else if kindIs "bool" . -}}
{{ . }}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) (kindIs "int" .) (kindIs "int64" .) (kindIs "int32" .) (kindIs "uint64" .) -}}
{{ toJson . }}
{{- else -}}
{{ fail (printf "virtstream: cannot write %v (%s) as a TOML value" . (kindOf .)) }}
{{- end -}}
{{- end }}

{{/* A table: (list "name" dict). Plain keys first, then sub-tables. */}}
{{- define "virtstream.toml.table" -}}
{{- $name := index . 0 }}
{{- $t := index . 1 -}}
[{{ $name }}]
{{- range $k, $v := $t }}
{{- if not (or (kindIs "map" $v) (kindIs "invalid" $v)) }}
{{ include "virtstream.toml.key" $k }} = {{ include "virtstream.toml.value" $v }}
{{- end }}
{{- end }}
{{- range $k, $v := $t }}
{{- if and (kindIs "map" $v) $v }}

{{ include "virtstream.toml.table" (list (printf "%s.%s" $name (include "virtstream.toml.key" $k)) $v) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
config.toml: the [host] [libvirt] [journal] [snapshot] [metrics] [log]
sections from config.*, [nats] / [kafka] only for an enabled sink and
[schema_registry] only when schemaRegistry.enabled, [hooks] only when
hooks.enabled, with the chart-managed
keys (url, brokers, TLS and authentication files) merged in. [usage] is
never rendered: only the usage tool reads it.
*/}}
{{- define "virtstream.configToml" -}}
{{- $v := .Values -}}
# config.toml of the virtstream agent, rendered by the virtstream Helm chart.
# host.id comes from VIRTSTREAM_HOST_ID (the node name, downward API).

{{- range $section := list "host" "libvirt" "journal" "snapshot" }}
{{- with (index $v.config $section) }}

{{ include "virtstream.toml.table" (list $section (deepCopy .)) }}
{{- end }}
{{- end }}

{{ include "virtstream.toml.table" (list "metrics" (dict "listen" (printf "0.0.0.0:%d" (int $v.metrics.port)))) }}
{{- with $v.config.log }}

{{ include "virtstream.toml.table" (list "log" (deepCopy .)) }}
{{- end }}
{{- if $v.nats.enabled }}
{{- $n := dict "url" $v.nats.url }}
{{- if $v.nats.tls.enabled }}{{ $_ := set $n "tls" true }}{{ end }}
{{- if $v.nats.auth.user }}{{ $_ := set $n "user" $v.nats.auth.user }}{{ end }}
{{- range (include "virtstream.natsSecretFiles" . | fromJsonArray) }}
{{- $_ := set $n .configKey (printf "%s/%s" (include "virtstream.secretDir" "nats") .file) }}
{{- end }}
{{- $n = merge $n (deepCopy (default dict $v.config.nats)) }}

{{ include "virtstream.toml.table" (list "nats" $n) }}
{{- end }}
{{- if $v.kafka.enabled }}
{{- $k := dict "brokers" $v.kafka.brokers }}
{{- if $v.kafka.tls.enabled }}{{ $_ := set $k "tls" true }}{{ end }}
{{- with $v.kafka.sasl }}
{{- if .mechanism }}
{{- $_ := set $k "sasl_mechanism" .mechanism }}
{{- $_ := set $k "sasl_username" .username }}
{{- end }}
{{- end }}
{{- range (include "virtstream.kafkaSecretFiles" . | fromJsonArray) }}
{{- $_ := set $k .configKey (printf "%s/%s" (include "virtstream.secretDir" "kafka") .file) }}
{{- end }}
{{- $k = merge $k (deepCopy (default dict $v.config.kafka)) }}

{{ include "virtstream.toml.table" (list "kafka" $k) }}
{{- end }}
{{- if $v.schemaRegistry.enabled }}
{{- $r := dict "url" $v.schemaRegistry.url }}
{{- with $v.schemaRegistry.auth.username }}{{ $_ := set $r "username" . }}{{ end }}
{{- range (include "virtstream.schemaRegistrySecretFiles" . | fromJsonArray) }}
{{- $_ := set $r .configKey (printf "%s/%s" (include "virtstream.secretDir" "schema-registry") .file) }}
{{- end }}
{{- $r = merge $r (deepCopy (default dict $v.config.schema_registry)) }}

{{ include "virtstream.toml.table" (list "schema_registry" $r) }}
{{- end }}
{{- if $v.hooks.enabled }}
{{- $h := $v.hooks }}

{{ include "virtstream.toml.table" (list "hooks" (dict "socket" (printf "%s/hooks.sock" $h.hostSocketDir) "spool" (printf "%s/hooks.spool" $h.hostSpoolDir) "spool_max_bytes" (int64 $h.spoolMaxBytes))) }}
{{- end }}
{{- end }}

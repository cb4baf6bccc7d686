{{/* Labels of every object (no chart or release labels: the default render
     equals the plain manifests of deploy/kubernetes). */}}
{{- define "ka.labels" -}}
app.kubernetes.io/name: ka-agent
app.kubernetes.io/part-of: ka
app.kubernetes.io/component: agent
{{- end }}

{{- define "ka.selectorLabels" -}}
app.kubernetes.io/name: ka-agent
app.kubernetes.io/component: agent
{{- end }}

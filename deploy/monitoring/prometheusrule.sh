#!/usr/bin/env bash
# Prints fusionserve.rules.yml wrapped in a PrometheusRule for the Prometheus Operator, so the
# rules exist once (the file promtool checks and tests):
#   bash deploy/monitoring/prometheusrule.sh | kubectl apply -f -
# NAMESPACE (fusionserve) and RELEASE (kube-prometheus-stack: the label the operator selects rules
# by) can be set in the environment. .ci/deploy_check.sh checks what it prints.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cat <<YAML
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: fusionserve
  namespace: ${NAMESPACE:-fusionserve}
  labels:
    app.kubernetes.io/name: fusionserve
    app.kubernetes.io/part-of: fusionserve
    release: ${RELEASE:-kube-prometheus-stack}
spec:
YAML
sed 's/^/  /' "$here/fusionserve.rules.yml"

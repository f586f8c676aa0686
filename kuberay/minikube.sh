#!/usr/bin/env bash
# visionserve on minikube through a KubeRay RayService.
#
#   kuberay/minikube.sh up      start minikube, install KubeRay, build the image, deploy, wait,
#                               smoke-test through a port-forward
#   kuberay/minikube.sh status  what is running
#   kuberay/minikube.sh down    delete the RayService and the operator, stop minikube
#                               (the VM and its cached model weights are kept; `minikube
#                               delete -p visionserve` removes them)
#
# Settings (environment): PROFILE (visionserve), MINIKUBE_DRIVER (docker, else podman),
# MINIKUBE_CPUS / MINIKUBE_MEMORY (MiB; default: from the manifest), WAIT_S (1800),
# VISIONSERVE_API_KEY (if set, stored in the Secret the pods read), SMOKE_IMAGE (a photo).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MANIFEST="$REPO/kuberay/rayservice.yaml"
PROFILE="${PROFILE:-visionserve}"
NAME="visionserve"                       # metadata.name in kuberay/cluster.yaml
KUBERAY_VERSION="1.7.0"
IMAGE="visionserve:latest"
WAIT_S="${WAIT_S:-1800}"
PORT="${PORT:-8000}"
PF_PID=""      # the smoke test's port-forward
BUILD_CTX=""   # the image's build context, a copy of only what the image installs

cleanup() {
    [[ -z "$PF_PID" ]] || kill "$PF_PID" 2>/dev/null || true
    [[ -z "$BUILD_CTX" ]] || rm -rf "$BUILD_CTX"
}
trap cleanup EXIT

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
kc() { kubectl --context "$PROFILE" "$@"; }

python_bin() {
    if [[ -x "$REPO/.venv/bin/python" ]]; then
        echo "$REPO/.venv/bin/python"
    else
        command -v python3 || die "python3 is needed (or run 'make setup' first)"
    fi
}

need() {
    local tool="$1" hint="$2"
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found: $hint"
}

pick_driver() {
    if [[ -n "${MINIKUBE_DRIVER:-}" ]]; then
        echo "$MINIKUBE_DRIVER"
    elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        echo docker
    elif command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then
        echo podman
    else
        die "no usable minikube driver: start Docker (https://docs.docker.com/engine/install/) \
or Podman, or set MINIKUBE_DRIVER to another driver minikube supports (kvm2, hyperkit, qemu...)"
    fi
}

check_tools() {
    need minikube "install it: https://minikube.sigs.k8s.io/docs/start/"
    need kubectl "install it: https://kubernetes.io/docs/tasks/tools/ (or alias 'minikube kubectl --')"
    need helm "install it: https://helm.sh/docs/intro/install/"
    need curl "install curl with your package manager"
}

# CPUs and memory the manifest needs at minReplicas, plus headroom and the system pods.
cluster_size() {
    local py
    py="$(python_bin)"
    (cd "$REPO" && "$py" -m kuberay.generate --print-minikube-size) \
        || die "could not read the size from $MANIFEST (is PyYAML installed? 'make setup')"
}

check_host_capacity() {
    local driver="$1" cpus="$2" mib="$3" host_cpus host_bytes
    [[ "$driver" == docker ]] || return 0
    read -r host_cpus host_bytes < <(docker info --format '{{.NCPU}} {{.MemTotal}}')
    if (( host_cpus < cpus || host_bytes / 1048576 < mib )); then
        die "the manifest needs $cpus CPUs and $mib MiB, Docker offers $host_cpus CPUs and \
$(( host_bytes / 1048576 )) MiB. Give Docker more, or set MINIKUBE_CPUS/MINIKUBE_MEMORY lower \
(pods that do not fit stay Pending), or disable models in config/serve.yaml and run 'make kuberay'."
    fi
}

start_minikube() {
    local driver size cpus mib
    driver="$(pick_driver)"
    size="$(cluster_size)"
    cpus="${MINIKUBE_CPUS:-${size% *}}"
    mib="${MINIKUBE_MEMORY:-${size#* }}"
    if minikube status -p "$PROFILE" >/dev/null 2>&1; then
        say "minikube profile '$PROFILE' is already running (its size is kept: 'minikube delete -p $PROFILE' to resize)"
        return
    fi
    check_host_capacity "$driver" "$cpus" "$mib"
    say "minikube start -p $PROFILE --driver=$driver --cpus=$cpus --memory=${mib}mb (1-3 min)"
    minikube start -p "$PROFILE" --driver="$driver" --cpus="$cpus" --memory="${mib}mb"
}

install_operator() {
    say "KubeRay operator $KUBERAY_VERSION (helm, ~1 min)"
    helm repo add kuberay https://ray-project.github.io/kuberay-helm/ >/dev/null 2>&1 || true
    helm repo update kuberay >/dev/null
    helm upgrade --install kuberay-operator kuberay/kuberay-operator \
        --version "$KUBERAY_VERSION" --kube-context "$PROFILE" --wait --timeout 5m
}

build_image() {
    # minikube sends the whole context directory into the VM; the checkout has a multi-GB
    # .venv and maybe model weights, so build from a copy of what the image needs.
    BUILD_CTX="$(mktemp -d "${TMPDIR:-/tmp}/visionserve-build.XXXXXX")"
    mkdir "$BUILD_CTX/kuberay"
    cp "$REPO/pyproject.toml" "$REPO/.dockerignore" "$BUILD_CTX/"
    [[ ! -f "$REPO/README.md" ]] || cp "$REPO/README.md" "$BUILD_CTX/"
    cp -R "$REPO/serve_app" "$BUILD_CTX/"
    cp "$REPO/kuberay/Dockerfile" "$BUILD_CTX/kuberay/"
    say "minikube image build -t $IMAGE -f kuberay/Dockerfile . (first time 5-15 min, then cached)"
    (cd "$BUILD_CTX" && minikube -p "$PROFILE" image build -t "$IMAGE" -f kuberay/Dockerfile .)
}

apply_manifest() {
    local rc=0
    (cd "$REPO" && "$(python_bin)" -m kuberay.generate --check) || rc=$?
    case "$rc" in
        0) ;;
        1) die "$MANIFEST is stale: run 'make kuberay' first" ;;
        *) die "could not check $MANIFEST against config/serve.yaml (run 'make setup' first)" ;;
    esac
    if [[ -n "${VISIONSERVE_API_KEY:-}" ]]; then
        say "Secret visionserve-api-key (from VISIONSERVE_API_KEY)"
        kc create secret generic visionserve-api-key \
            --from-literal=api-key="$VISIONSERVE_API_KEY" --dry-run=client -o yaml | kc apply -f -
    fi
    say "kubectl apply -f kuberay/rayservice.yaml"
    kc apply -f "$MANIFEST"
}

wait_ready() {
    say "waiting for RayService $NAME to be Ready (at most ${WAIT_S}s; the first start downloads ~1.7 GB of weights)"
    local start ready reason
    start=$SECONDS
    while (( SECONDS - start < WAIT_S )); do
        ready="$(kc get rayservice "$NAME" \
            -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true)"
        if [[ "$ready" == True ]]; then
            say "RayService $NAME is Ready after $(( SECONDS - start ))s"
            return 0
        fi
        reason="$(kc get rayservice "$NAME" \
            -o jsonpath='{.status.conditions[?(@.type=="Ready")].reason}' 2>/dev/null || true)"
        printf '[%4ds] Ready=%s %s\n' "$(( SECONDS - start ))" "${ready:-?}" "${reason:-}"
        kc get pods -l ray.io/node-type --no-headers 2>/dev/null \
            | sed 's/^/        /' || true
        sleep 15
    done
    kc describe rayservice "$NAME" | tail -n 30 || true
    die "not Ready after ${WAIT_S}s; see 'kuberay/minikube.sh status' and README.md (Run on Kubernetes)"
}

smoke_test() {
    local image="${SMOKE_IMAGE:-$REPO/../shared/data/images/pigo_sample.jpg}" out
    if [[ ! -f "$image" ]]; then
        # No photo at hand: a plain grey PNG still exercises the whole path (0 faces).
        image="$(mktemp "${TMPDIR:-/tmp}/visionserve-smoke.XXXXXX")"
        "$(python_bin)" -c "import sys, cv2, numpy as np; \
open(sys.argv[1], 'wb').write(cv2.imencode('.png', np.full((240, 320, 3), 128, np.uint8))[1])" \
            "$image" || die "set SMOKE_IMAGE to a photo"
    fi
    say "kubectl port-forward svc/$NAME-serve-svc $PORT:8000, then a detection request"
    # kubectl itself, not the kc function: $! must be the port-forward's own pid.
    kubectl --context "$PROFILE" port-forward "svc/$NAME-serve-svc" "$PORT:8000" >/dev/null 2>&1 &
    PF_PID=$!  # stopped by cleanup() when the script exits
    for _ in $(seq 1 20); do
        curl -fsS "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
        sleep 1
    done
    local auth=()
    [[ -n "${VISIONSERVE_API_KEY:-}" ]] && auth=(-H "Authorization: Bearer $VISIONSERVE_API_KEY")
    out="$(curl -fsS --max-time 120 ${auth[@]+"${auth[@]}"} --data-binary "@$image" \
        "http://127.0.0.1:$PORT/v1/detect/cnn-face-detection")" \
        || die "smoke request failed; see 'kuberay/minikube.sh status'"
    printf '%s\n' "$out" | head -c 600
    printf '\n'
    say "up. To use it: kubectl --context $PROFILE port-forward svc/$NAME-serve-svc $PORT:8000"
}

status() {
    minikube status -p "$PROFILE" || true
    kc get rayservice "$NAME" -o wide 2>/dev/null || echo "no RayService $NAME"
    kc get pods -o wide 2>/dev/null || true
    kc get svc "$NAME-serve-svc" 2>/dev/null || echo "no $NAME-serve-svc yet (it appears once the apps are healthy)"
}

down() {
    if minikube status -p "$PROFILE" >/dev/null 2>&1; then
        say "kubectl delete -f kuberay/rayservice.yaml"
        kc delete -f "$MANIFEST" --ignore-not-found --wait=true
        say "helm uninstall kuberay-operator"
        helm uninstall kuberay-operator --kube-context "$PROFILE" 2>/dev/null || true
    fi
    say "minikube stop -p $PROFILE"
    minikube stop -p "$PROFILE" || true
}

main() {
    local cmd="${1:-}"
    case "$cmd" in
        up)
            check_tools
            start_minikube
            install_operator
            build_image
            apply_manifest
            wait_ready
            smoke_test
            ;;
        status)
            need minikube "install it: https://minikube.sigs.k8s.io/docs/start/"
            need kubectl "install it: https://kubernetes.io/docs/tasks/tools/"
            status
            ;;
        down)
            check_tools
            down
            ;;
        *)
            sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            [[ -z "$cmd" || "$cmd" == -h || "$cmd" == --help ]] || exit 2
            ;;
    esac
}

main "$@"

"""The KubeRay manifest: schema, staleness, fit of the deployments, and the minikube script.

No Kubernetes here: the manifest is checked against KubeRay 1.7's own CRD schema (as strict as
`kubectl apply --validate=strict`) and against the arithmetic Ray uses to place replicas.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from kuberay import generate as gen
from kuberay import sizing
from kuberay.footprint import cluster_footprint, minikube_size
from kuberay.quantity import cpu_cores, memory_bytes
from serve_app.config import load_config, validate_config
from serve_app.registry import MODELS

REPO = Path(__file__).resolve().parents[1]
CRDS = Path(__file__).resolve().parents[1].parent / "shared" / "kuberay-crds"
SCRIPT = REPO / "kuberay" / "minikube.sh"
DOCKERFILE = REPO / "kuberay" / "Dockerfile"


@pytest.fixture(scope="module")
def generated() -> str:
    return gen.generate()


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(gen.MANIFEST.read_text())


@pytest.fixture(scope="module")
def cluster() -> dict:
    return sizing.load_cluster()


@pytest.fixture(scope="module")
def serve_cfg() -> dict:
    cfg = load_config()
    validate_config(cfg)
    return cfg


def _pods(manifest: dict) -> list[tuple[str, dict]]:
    rc = manifest["spec"]["rayClusterConfig"]
    out = [("head", rc["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in rc["workerGroupSpecs"]]
    return out


# -- schema ----------------------------------------------------------------------------------
def _strict(schema: object) -> object:
    """The CRD's OpenAPI v3 schema as JSON Schema that refuses unknown fields.

    The API server prunes unknown fields silently (a typo just disappears), so a plain
    validation would pass them; closing every object that lists its properties catches them.
    x-kubernetes-* keys and `format: int32` are not JSON Schema and are ignored by jsonschema;
    int-or-string fields already carry `anyOf: [integer, string]`."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayservice_schema() -> dict:
    crd_file = CRDS / "ray.io_rayservices.yaml"
    if not crd_file.exists():
        pytest.skip(f"{crd_file} is absent: the shared KubeRay CRDs (../shared) are not here")
    crd = yaml.safe_load(crd_file.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(v1["schema"]["openAPIV3Schema"])


def test_manifest_validates_against_the_kuberay_crd(manifest, rayservice_schema):
    import jsonschema

    jsonschema.validate(manifest, rayservice_schema)


def test_schema_check_catches_a_misspelt_field(manifest, rayservice_schema):
    import jsonschema

    bad = copy.deepcopy(manifest)
    bad["spec"]["rayClusterConfig"]["autoscalerOptions"]["idleTimeoutSecond"] = 60
    with pytest.raises(jsonschema.ValidationError, match="idleTimeoutSecond"):
        jsonschema.validate(bad, rayservice_schema)


def test_autoscaler_is_v2_in_tree(manifest):
    rc = manifest["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["autoscalerOptions"]["version"] == "v2"
    assert rc["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"


def test_no_deprecated_fields(manifest):
    text = yaml.safe_dump(manifest)
    for field in ("serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"):
        assert field not in text


# -- generated from the config ---------------------------------------------------------------
def test_committed_manifest_is_current(generated):
    assert gen.MANIFEST.read_text() == generated, "stale: run `make kuberay` and commit"


def test_check_mode_reports_staleness(tmp_path, generated):
    stale = tmp_path / "rayservice.yaml"
    stale.write_text(generated + "# edited by hand\n")
    assert gen.main(["--check", "--output", str(stale)]) == 1
    stale.write_text(generated)
    assert gen.main(["--check", "--output", str(stale)]) == 0


def test_serve_config_is_the_config_with_only_the_host_changed(manifest, serve_cfg):
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    expected = copy.deepcopy(serve_cfg)
    expected["http_options"]["host"] = "0.0.0.0"
    assert embedded == expected
    validate_config(embedded)
    # Verbatim text, comments included: only the host line differs.
    original = [line.rstrip() for line in gen.SERVE_CONFIG.read_text().splitlines()]
    embedded_lines = manifest["spec"]["serveConfigV2"].splitlines()
    assert len(original) == len(embedded_lines)
    changed = [(a, b) for a, b in zip(original, embedded_lines, strict=True) if a != b]
    assert len(changed) == 1 and re.match(r"^\s+host: 0\.0\.0\.0\b", changed[0][1])
    assert "http_options.host: 0.0.0.0" in gen.MANIFEST.read_text().split("apiVersion")[0]


def test_host_edit_also_inserts_a_missing_host():
    text = "http_options:\n  port: 8000\napplications: []\n"
    assert yaml.safe_load(gen.cluster_serve_text(text))["http_options"] == {
        "host": "0.0.0.0", "port": 8000}


def test_every_deployment_autoscales(serve_cfg):
    for dep in serve_cfg["applications"][0]["deployments"]:
        assert "autoscaling_config" in dep, dep["name"]
        assert "num_replicas" not in dep, dep["name"]


# -- fit -------------------------------------------------------------------------------------
def test_every_enabled_replica_fits_a_pod_of_its_group(cluster, serve_cfg):
    groups = sizing.groups(cluster)
    meant = sizing.placement(cluster, sizing.replicas(serve_cfg), groups)
    for r in sizing.replicas(serve_cfg):
        if r.enabled:
            assert any(sizing.fits(r, g) for g in meant[r.name]), r


def test_segmenters_fit_only_the_groups_meant_for_them(cluster, serve_cfg):
    groups = sizing.groups(cluster)
    meant = sizing.placement(cluster, sizing.replicas(serve_cfg), groups)
    for r in sizing.replicas(serve_cfg):
        if r.name in MODELS and MODELS[r.name].kind == "segmenter" and r.enabled:
            fits = {g.name for g in groups if sizing.fits(r, g)}
            assert fits <= {g.name for g in meant[r.name]}, (r.name, fits)
    # The large SAM models are kept off the cpu group by memory alone.
    by_name = {g.name: g for g in groups}
    for name in ("sam-segmentation-light", "sam-segmentation", "sam-vit-h"):
        (r,) = [r for r in sizing.replicas(serve_cfg) if r.name == name]
        assert not sizing.fits(r, by_name["cpu"]) and sizing.fits(r, by_name["sam"])


def test_max_replicas_fit_the_groups_max_capacity(cluster, serve_cfg):
    groups = sizing.groups(cluster)
    reps = [r for r in sizing.replicas(serve_cfg) if r.enabled]
    # Sum: everything at max_replicas against every group at maxReplicas.
    need_cpu = sum(r.max_replicas * r.num_cpus for r in reps)
    need_mem = sum(r.max_replicas * r.memory for r in reps)
    assert need_cpu <= sum(g.max_replicas * g.ray_cpus for g in groups)
    assert need_mem <= sum(g.max_replicas * g.ray_memory for g in groups)
    # Packing (replicas are indivisible), into the groups meant for each deployment.
    meant = sizing.placement(cluster, sizing.replicas(serve_cfg), groups)
    packed = sizing.pack(reps, meant, "max_replicas")
    for g in groups:
        assert len(packed.get(g.name, [])) <= g.max_replicas


def test_min_replicas_fit_the_groups_min_pods(cluster, serve_cfg):
    groups = sizing.groups(cluster)
    reps = sizing.replicas(serve_cfg)
    packed = sizing.pack(reps, sizing.placement(cluster, reps, groups), "min_replicas")
    for g in groups:
        assert len(packed.get(g.name, [])) <= g.min_replicas


def test_head_takes_no_replicas(manifest, serve_cfg):
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    # ...which keeps replicas off it only if every replica asks for some CPU.
    for r in sizing.replicas(serve_cfg):
        assert r.num_cpus > 0, r.name


def test_head_has_at_least_3_5_gib(manifest):
    (container,) = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"]
    assert memory_bytes(container["resources"]["limits"]["memory"]) >= 3.5 * 2**30


def test_requests_equal_limits_everywhere(manifest):
    rc = manifest["spec"]["rayClusterConfig"]
    resources = [("autoscaler", rc["autoscalerOptions"]["resources"])]
    for where, pod in _pods(manifest):
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            resources.append((f"{where}/{c['name']}", c["resources"]))
    for where, res in resources:
        assert res["requests"] == res["limits"], where
        assert {"cpu", "memory"} <= set(res["limits"]), where


def test_ray_start_params_match_the_pods(manifest, cluster):
    groups = {g.name: g for g in sizing.groups(cluster)}
    for spec in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        params = spec["rayStartParams"]
        limits = spec["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(params["num-cpus"]) == cpu_cores(limits["cpu"])
        ray_mem = int(params["memory"]) + int(params["object-store-memory"])
        assert ray_mem < memory_bytes(limits["memory"])  # the rest is the agents' share
        assert int(params["memory"]) == groups[spec["groupName"]].ray_memory
        assert spec["minReplicas"] <= spec["replicas"] <= spec["maxReplicas"]


# -- pods ------------------------------------------------------------------------------------
def test_image_is_built_inside_minikube(manifest):
    for _, pod in _pods(manifest):
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            assert c["image"] == "visionserve:latest"
            assert c["imagePullPolicy"] == "IfNotPresent"


def test_api_key_comes_from_an_optional_secret_on_every_ray_container(manifest):
    for where, pod in _pods(manifest):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        ref = env["VISIONSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "visionserve-api-key", "key": "api-key", "optional": True}, where


def test_workers_fetch_the_weights_of_what_can_land_on_them(manifest, serve_cfg):
    from serve_app.models.weights import REGISTRY

    models = serve_cfg["applications"][0]["args"]["models"]
    for spec in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        pod = spec["template"]["spec"]
        (init,) = pod["initContainers"]
        cmd = init["command"]
        assert cmd[:4] == ["python", "-m", "serve_app.models", "fetch"]
        names = [a for a in cmd[4:] if not a.startswith("-") and a != "/models"]
        assert names and set(names) <= set(REGISTRY)
        assert "sam_vit_h" not in names  # disabled: its 2.5 GB are not fetched
        (ray,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in ray["env"]}
        assert env["MODEL_DIR"] == "/models"
        assert ray["volumeMounts"] == [{"name": "models", "mountPath": "/models",
                                        "readOnly": True}]
        if spec["groupName"] == "sam":
            for model in ("sam-segmentation", "sam-segmentation-light", "sam-mobile"):
                assert models[model]["options"]["weights"] in names
        assert models["face-detect-pigo"]["options"]["weights"] in names


def test_minikube_size_covers_the_cluster_at_min(manifest, cluster):
    cpus, mib = minikube_size(manifest, cluster["minikube"])
    cpu, mem = cluster_footprint(manifest, {})
    assert cpus >= cpu + 1 and mib * 2**20 >= mem + 2**30
    out = subprocess.run(
        [sys.executable, "-m", "kuberay.generate", "--print-minikube-size"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert [int(x) for x in out] == [cpus, mib]


def test_versions_agree_with_pyproject(manifest):
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(re.match(r"^([\w\-\[\]]+)==([\w.]+)", d).groups() for d in deps if "==" in d)
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == pins["ray[serve]"]
    docker = DOCKERFILE.read_text()
    assert f"ARG TORCH_VERSION={pins['torch']}" in docker
    assert f"ARG TORCHVISION_VERSION={pins['torchvision']}" in docker
    assert re.search(r"^FROM python:3\.11", docker, re.M)


# -- minikube.sh -----------------------------------------------------------------------------
def test_minikube_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_minikube_script_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian package `shellcheck`)")
    result = subprocess.run(["shellcheck", "-x", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


_STUB = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
case "$(basename "$0") $*" in
  "docker info --format"*) echo "16 68719476736" ;;
  "minikube status"*) exit 1 ;;                      # not running yet
  "minikube -p visionserve image build"*) ls -A > "$STUB_LOG.context" ;;
  *"jsonpath={.status.conditions[?(@.type==\\"Ready\\")].status}"*) echo True ;;
  *" port-forward "*) echo $$ > "$STUB_LOG.pf"; exec sleep 60 ;;
  "curl"*"/v1/detect/"*) echo '{"faces": []}' ;;
esac
exit 0
"""


def test_minikube_up_runs_the_documented_commands(tmp_path):
    """`up` with stand-ins for docker, minikube, helm, kubectl and curl: the commands it runs,
    in order, and the port-forward it starts is stopped when it exits."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("docker", "minikube", "helm", "kubectl", "curl"):
        (bin_dir / tool).write_text(_STUB)
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "calls.log"
    image = tmp_path / "face.jpg"
    image.write_bytes(b"\xff\xd8\xff")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(log), "HOME": str(tmp_path),
           "SMOKE_IMAGE": str(image), "WAIT_S": "30"}
    result = subprocess.run(["bash", str(SCRIPT), "up"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text().splitlines()
    cpus, mib = (subprocess.run([sys.executable, "-m", "kuberay.generate",
                                 "--print-minikube-size"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.split())
    expected = [
        f"minikube start -p visionserve --driver=docker --cpus={cpus} --memory={mib}mb",
        "helm repo add kuberay https://ray-project.github.io/kuberay-helm/",
        "helm upgrade --install kuberay-operator kuberay/kuberay-operator --version 1.7.0",
        "minikube -p visionserve image build -t visionserve:latest -f kuberay/Dockerfile .",
        f"kubectl --context visionserve apply -f {gen.MANIFEST}",
        "kubectl --context visionserve port-forward svc/visionserve-serve-svc 8000:8000",
        f"curl -fsS --max-time 120 --data-binary @{image} "
        "http://127.0.0.1:8000/v1/detect/cnn-face-detection",
    ]
    positions = [next((i for i, c in enumerate(calls) if c.startswith(e)), -1) for e in expected]
    assert -1 not in positions and positions == sorted(positions), "\n".join(calls)
    # The build context is a copy of what the image installs, not the checkout (.venv...).
    context = set(Path(f"{log}.context").read_text().split())
    assert context - {"README.md"} == {".dockerignore", "kuberay", "pyproject.toml", "serve_app"}
    pf_pid = int(Path(f"{log}.pf").read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{pf_pid}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{pf_pid}").exists(), "port-forward left running"

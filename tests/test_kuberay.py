"""The KubeRay manifests: schema, staleness, the cluster overlay, fit of the deployments, the
weights Job, the image lock, and the minikube script.

No Kubernetes here: the manifests are checked against KubeRay 1.7's own CRD schema (as strict
as `kubectl apply --validate=strict`), read by Ray's own KubeRay autoscaler config code, and
checked against the arithmetic Ray uses to place replicas.
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
from kuberay import overlay, sizing
from kuberay.footprint import cluster_footprint, minikube_size
from kuberay.profile import fits_budget
from kuberay.quantity import cpu_cores, memory_bytes
from serve_app.config import load_config, validate_config
from serve_app.registry import MODELS

REPO = Path(__file__).resolve().parents[1]
CRDS = Path(__file__).resolve().parents[1].parent / "shared" / "kuberay-crds"
SCRIPT = REPO / "kuberay" / "minikube.sh"
DOCKERFILE = REPO / "kuberay" / "Dockerfile"


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return gen.generate_all()


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(gen.MANIFEST.read_text())


@pytest.fixture(scope="module")
def minikube_manifest() -> dict:
    return yaml.safe_load(gen.MINIKUBE_MANIFEST.read_text())


@pytest.fixture(scope="module")
def job_docs() -> list[dict]:
    return list(yaml.safe_load_all(gen.JOB_MANIFEST.read_text()))


@pytest.fixture(scope="module")
def cluster() -> dict:
    return sizing.load_cluster()


@pytest.fixture(scope="module")
def serve_cfg() -> dict:
    """config/serve.yaml as the cluster runs it (the overlay merged in)."""
    cfg = load_config()
    validate_config(cfg)
    return overlay.cluster_serve_config(cfg, sizing.load_cluster())


def _variant(**changes) -> dict:
    """The cluster manifest built from a changed copy of kuberay/cluster.yaml."""
    cluster = sizing.load_cluster()
    for group in cluster["workerGroups"]:
        if group["name"] in changes.get("enable_groups", ()):
            group["enabled"] = True
    if changes.get("ha"):
        cluster["ha"]["enabled"] = True
    return gen.build_manifest(load_config(), cluster)


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


def test_manifest_validates_against_the_kuberay_crd(manifest, minikube_manifest, rayservice_schema):
    import jsonschema

    jsonschema.validate(manifest, rayservice_schema)
    jsonschema.validate(minikube_manifest, rayservice_schema)


def test_gpu_and_ha_options_validate_against_the_crd(rayservice_schema):
    import jsonschema

    jsonschema.validate(_variant(enable_groups=("gpu",), ha=True), rayservice_schema)


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


# -- what Ray's KubeRay autoscaler reads -------------------------------------------------------
def _autoscaling_config(manifest: dict) -> dict:
    """The config KubeRay's in-tree autoscaler derives from the RayCluster that the RayService
    creates (its spec is rayClusterConfig): Ray's own code, not ours."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    cr = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": manifest["metadata"]["name"], "namespace": "default"},
        "spec": manifest["spec"]["rayClusterConfig"],
    }
    return _derive_autoscaling_config_from_ray_cr(cr)


def test_ray_autoscaler_reads_the_groups_and_limits(manifest, cluster):
    config = _autoscaling_config(manifest)
    types = config["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0  # no replica on the head
    groups = {g.name: g for g in sizing.groups(cluster)}
    assert set(types) - {"headgroup"} == set(groups) == {"cpu", "sam"}
    for name, g in groups.items():
        t = types[name]
        assert (t["min_workers"], t["max_workers"]) == (g.min_replicas, g.max_replicas)
        assert t["resources"]["CPU"] == g.ray_cpus
        assert t["resources"]["memory"] == g.ray_memory
        assert t["labels"] == {"visionserve.io/group": name}
    # What docs/kubernetes.md states.
    assert (types["cpu"]["min_workers"], types["cpu"]["max_workers"]) == (4, 12)
    assert (types["sam"]["min_workers"], types["sam"]["max_workers"]) == (1, 4)
    assert types["cpu"]["resources"]["CPU"] == 2 and types["sam"]["resources"]["CPU"] == 5
    assert config["max_workers"] == 16
    assert config["idle_timeout_minutes"] == 1.0


def test_ray_autoscaler_sees_the_gpu_group_when_enabled():
    types = _autoscaling_config(_variant(enable_groups=("gpu",)))["available_node_types"]
    assert types["gpu"]["resources"]["GPU"] == 1
    assert types["gpu"]["labels"] == {"visionserve.io/group": "gpu"}


# -- generated from the config ---------------------------------------------------------------
def test_committed_manifests_are_current(generated):
    for name, text in generated.items():
        assert (gen.MANIFEST.parent / name).read_text() == text, f"{name} is stale: make kuberay"


def test_check_mode_reports_staleness(tmp_path, generated):
    for name, text in generated.items():
        (tmp_path / name).write_text(text)
    assert gen.main(["--check", "--out-dir", str(tmp_path)]) == 0
    stale = tmp_path / gen.MINIKUBE_MANIFEST.name
    stale.write_text(generated[stale.name] + "# edited by hand\n")
    assert gen.main(["--check", "--out-dir", str(tmp_path)]) == 1


def test_serve_config_is_the_config_merged_with_the_overlay(manifest, serve_cfg, cluster):
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert embedded == serve_cfg
    validate_config(embedded)
    assert embedded["http_options"]["host"] == "0.0.0.0"
    deps = {d["name"]: d for d in embedded["applications"][0]["deployments"]}
    laptop = {d["name"]: d for d in load_config()["applications"][0]["deployments"]}
    # The overlay's shares replace the laptop's; everything it does not name is the laptop's.
    for name, over in cluster["serve"]["deployments"].items():
        for key, value in (over.get("ray_actor_options") or {}).items():
            assert deps[name]["ray_actor_options"][key] == value
        assert deps[name]["max_ongoing_requests"] == laptop[name]["max_ongoing_requests"]
    assert deps["router"]["autoscaling_config"]["min_replicas"] == 2  # HA: two routers


def test_cluster_num_cpus_are_whole_threads_for_models(serve_cfg):
    # A replica runs ceil(num_cpus) threads; on the cluster it asks for exactly those.
    for dep in serve_cfg["applications"][0]["deployments"]:
        if dep["name"] in MODELS:
            n = dep["ray_actor_options"]["num_cpus"]
            assert n == int(n) >= 1, dep["name"]


def test_each_deployment_selects_its_group(serve_cfg, cluster):
    deps = serve_cfg["applications"][0]["deployments"]
    where = sizing.group_of(cluster, [d["name"] for d in deps])
    for dep in deps:
        selector = dep["ray_actor_options"]["label_selector"]
        assert selector == {"visionserve.io/group": where[dep["name"]]}


def test_graceful_shutdown_covers_the_model_timeouts(serve_cfg, manifest):
    app = serve_cfg["applications"][0]
    models = app["args"]["models"]
    longest = max(m["timeout_s"] for m in models.values())
    for dep in app["deployments"]:
        need = models[dep["name"]]["timeout_s"] if dep["name"] in models else longest
        assert dep["graceful_shutdown_timeout_s"] >= need, dep["name"]
    for spec in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
        placed = [
            d
            for d in app["deployments"]
            if d["ray_actor_options"]["label_selector"]["visionserve.io/group"] == spec["groupName"]
        ]
        assert grace >= max(d["graceful_shutdown_timeout_s"] for d in placed) + 30


def test_overlay_refuses_a_short_graceful_shutdown(cluster):
    bad = copy.deepcopy(cluster)
    bad["serve"]["deployments"]["sam-segmentation"]["graceful_shutdown_timeout_s"] = 20
    with pytest.raises(sizing.SizingError, match="sam-segmentation"):
        overlay.cluster_serve_config(load_config(), bad)


def _toggled(cfg: dict, name: str) -> dict:
    out = copy.deepcopy(cfg)
    app = out["applications"][0]
    model = app["args"]["models"][name]
    model["enabled"] = not model.get("enabled", True)
    dep = next(d for d in app["deployments"] if d["name"] == name)
    if not model["enabled"]:  # a disabled model holds nothing (validate_config insists)
        dep["autoscaling_config"].update(min_replicas=0, initial_replicas=0)
    else:
        dep["autoscaling_config"].update(min_replicas=1, initial_replicas=1)
    return out


@pytest.mark.parametrize("model", sorted(MODELS))
def test_toggling_a_model_changes_serve_config_only(model, cluster):
    """KubeRay rebuilds the whole Ray cluster (twice the capacity for a while) when
    rayClusterConfig changes; a model switched on or off must only change serveConfigV2."""
    base_cfg = load_config()
    before = gen.build_manifest(base_cfg, cluster)
    after = gen.build_manifest(_toggled(base_cfg, model), cluster)
    assert after["spec"]["rayClusterConfig"] == before["spec"]["rayClusterConfig"]
    assert after["spec"]["serveConfigV2"] != before["spec"]["serveConfigV2"]
    job_before = gen.build_job(base_cfg, cluster)
    assert gen.build_job(_toggled(base_cfg, model), cluster) == job_before


def test_host_is_0_0_0_0_on_the_cluster_only():
    assert load_config()["http_options"]["host"] == "127.0.0.1"


def test_the_cluster_requires_an_api_key_the_laptop_does_not(serve_cfg):
    assert serve_cfg["applications"][0]["args"]["require_api_key"] is True
    assert load_config()["applications"][0]["args"]["require_api_key"] is False


def test_every_deployment_autoscales(serve_cfg):
    for dep in serve_cfg["applications"][0]["deployments"]:
        assert "autoscaling_config" in dep, dep["name"]
        assert "num_replicas" not in dep, dep["name"]


# -- fit -------------------------------------------------------------------------------------
def test_every_replica_fits_a_pod_of_its_group(cluster, serve_cfg):
    groups = sizing.groups(cluster)
    meant = sizing.placement(cluster, sizing.replicas(serve_cfg), groups)
    for r in sizing.replicas(serve_cfg):  # disabled ones too: they can be switched on
        assert any(sizing.fits(r, g) for g in meant[r.name]), r


def test_replicas_fit_only_the_group_they_select(cluster, serve_cfg):
    groups = sizing.groups(cluster)
    reps = sizing.replicas(serve_cfg)
    where = sizing.group_of(cluster, [r.name for r in reps])
    for r in reps:
        fits = {g.name for g in groups if sizing.fits(r, g)}
        assert fits == {where[r.name]}, (r.name, fits)


def test_max_replicas_of_every_model_fit_the_groups_max(cluster, serve_cfg):
    groups = sizing.groups(cluster)
    reps = sizing.replicas(serve_cfg)
    meant = sizing.placement(cluster, reps, groups)
    packed = sizing.pack(reps, meant, "max_replicas", everything=True)
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
    for r in sizing.replicas(serve_cfg):
        assert r.num_cpus > 0, r.name


def test_head_has_at_least_3_5_gib(manifest):
    (container,) = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"
    ]
    assert memory_bytes(container["resources"]["limits"]["memory"]) >= 3.5 * 2**30


def test_requests_equal_limits_everywhere(manifest, job_docs):
    rc = manifest["spec"]["rayClusterConfig"]
    resources = [("autoscaler", rc["autoscalerOptions"]["resources"])]
    for where, pod in _pods(manifest):
        for c in pod["containers"]:
            resources.append((f"{where}/{c['name']}", c["resources"]))
    resources.append(("job", job_docs[1]["spec"]["template"]["spec"]["containers"][0]["resources"]))
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


def test_gpu_group_gets_the_sam_deployments_with_num_gpus(cluster):
    m = _variant(enable_groups=("gpu",))
    (gpu,) = [
        g for g in m["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu"
    ]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    deps = {
        d["name"]: d
        for d in yaml.safe_load(m["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    }
    for name, n in cluster["gpu"]["numGpus"].items():
        assert deps[name]["ray_actor_options"]["num_gpus"] == n
        assert deps[name]["ray_actor_options"]["label_selector"] == {"visionserve.io/group": "gpu"}
    assert "num_gpus" not in deps["cnn-face-detection"]["ray_actor_options"]


def test_ha_option_sets_gcs_fault_tolerance(manifest):
    assert "gcsFaultToleranceOptions" not in manifest["spec"]["rayClusterConfig"]
    ft = _variant(ha=True)["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"].startswith("redis://")
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "visionserve-redis"


def test_api_key_comes_from_a_required_secret_on_every_ray_container(manifest):
    # The generated config sets require_api_key: true, so the Secret is not optional.
    for where, pod in _pods(manifest):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        ref = env["VISIONSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "visionserve-api-key", "key": "api-key", "optional": False}, where


# -- weights ---------------------------------------------------------------------------------
def test_weights_job_fetches_every_registry_file_the_config_can_enable(job_docs):
    from serve_app.models.weights import REGISTRY

    claim, job = job_docs
    assert claim["kind"] == "PersistentVolumeClaim" and job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][:4] == ["python", "-m", "serve_app.models", "fetch"]
    assert "--keep-going" not in c["command"]  # a failed download fails the Job
    names = [a for a in c["command"][4:] if not a.startswith("-") and a != "/models"]
    assert names == gen.all_weights(load_config())
    assert "sam_vit_h" in names  # disabled in config/serve.yaml, but it can be switched on
    assert set(names) <= set(REGISTRY)
    # Non-root.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_offline_job_installs_from_a_node_folder(tmp_path):
    assert gen.main(["--offline-from", "/preload-src", "--out-dir", str(tmp_path)]) == 0
    _, job = yaml.safe_load_all((tmp_path / gen.JOB_MANIFEST.name).read_text())
    pod = job["spec"]["template"]["spec"]
    cmd = pod["containers"][0]["command"]
    assert cmd[cmd.index("--from") + 1] == "/preload"
    assert {"name": "preload", "hostPath": {"path": "/preload-src", "type": "Directory"}} in (
        pod["volumes"]
    )


def test_ray_pods_mount_the_weights_read_only_and_download_nothing(manifest, job_docs):
    claim = job_docs[0]["metadata"]["name"]
    for where, pod in _pods(manifest):
        assert "initContainers" not in pod, where
        if where == "head":
            continue
        (ray,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in ray["env"]}
        assert env["MODEL_DIR"] == "/models"
        assert env[gen.REQUIRE_WEIGHTS_ENV] == "1"
        assert ray["volumeMounts"] == [{"name": "models", "mountPath": "/models", "readOnly": True}]
        assert pod["volumes"] == [
            {"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        ]


def test_missing_weights_fail_the_health_check_only_when_required(tmp_path, monkeypatch):
    from serve_app.deployments.base import REQUIRE_WEIGHTS_ENV, ModelDeployment

    class NeedsVitH(ModelDeployment):  # the registry says which files sam-vit-h needs
        def load(self) -> None:
            raise AssertionError("never loaded: its weights are missing")

    monkeypatch.delenv(REQUIRE_WEIGHTS_ENV, raising=False)
    options = {"variant": "vit_h", "weights": "sam_vit_h"}
    replica = NeedsVitH("sam-vit-h", options, str(tmp_path), 10**6)
    replica.check_health()  # locally: a 503 per request, not a restart
    monkeypatch.setenv(REQUIRE_WEIGHTS_ENV, "1")
    with pytest.raises(RuntimeError, match="sam_vit_h"):
        replica.check_health()
    assert REQUIRE_WEIGHTS_ENV == gen.REQUIRE_WEIGHTS_ENV


def test_replica_start_waits_for_the_weights():
    """With REQUIRE_WEIGHTS_ENV a replica's start blocks until its files are there (the real
    wait inside Serve: tests/test_weights_health.py)."""
    from serve_app.deployments.base import _wait_for

    answers = [["sam_vit_h"], ["sam_vit_h"], []]
    _wait_for(lambda: answers.pop(0), "sam-vit-h", poll_s=0.01)
    assert answers == []


# -- image -----------------------------------------------------------------------------------
def test_image_tag_is_derived_from_the_locks(manifest, job_docs):
    tag = gen.image_tag()
    assert re.fullmatch(r"deps-[0-9a-f]{12}", tag)
    for _, pod in _pods(manifest):
        assert pod["containers"][0]["image"] == f"visionserve:{tag}"
    assert job_docs[1]["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"visionserve:{tag}"
    )
    assert re.fullmatch(r"src-[0-9a-f]{12}", gen.image_tag("source"))


def test_lock_files_pin_everything_with_hashes():
    for name in ("requirements.lock", "requirements-gpu.lock"):
        text = (REPO / "kuberay" / name).read_text()
        entries = re.split(r"\n(?=[a-z0-9])", text.strip())
        pins = [e for e in entries if re.match(r"^[a-z0-9][\w.\-\[\]]*==", e)]
        assert len(pins) > 50 and len(pins) == len(entries), name
        for entry in pins:
            assert "--hash=sha256:" in entry, entry.splitlines()[0]
        assert "\nray==2.58.0 " in "\n" + text, name
    cpu = (REPO / "kuberay" / "requirements.lock").read_text()
    assert not re.search(r"^(torch|torchvision|triton|nvidia-)", cpu, re.M)
    gpu = (REPO / "kuberay" / "requirements-gpu.lock").read_text()
    assert re.search(r"^torch==2\.14\.1 ", gpu, re.M)


def test_versions_agree_with_pyproject(manifest):
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(re.match(r"^([\w\-\[\]]+)==([\w.]+)", d).groups() for d in deps if "==" in d)
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == pins["ray[serve]"]
    torch_lock = (REPO / "kuberay" / "torch-cpu.lock").read_text()
    assert f"torch=={pins['torch']}+cpu" in torch_lock
    assert f"torchvision=={pins['torchvision']}+cpu" in torch_lock


def test_dockerfile_installs_from_the_locks_on_a_pinned_base():
    docker = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim@sha256:[0-9a-f]{64}$", docker, re.M)
    assert "--require-hashes -r /tmp/lock/requirements.lock" in docker
    assert "--require-hashes -r /tmp/lock/requirements-gpu.lock" in docker
    assert "pip check" in docker
    ignored = (REPO / ".dockerignore").read_text()
    for lock in ("requirements.lock", "requirements-gpu.lock", "torch-cpu.lock"):
        assert f"!kuberay/{lock}" in ignored


# -- the minikube profile --------------------------------------------------------------------
def test_minikube_profile_fits_its_budget_and_caps_max_replicas(
    minikube_manifest, manifest, cluster
):
    groups = {
        g["groupName"]: g for g in minikube_manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    }
    full = {g["groupName"]: g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    for name, g in groups.items():
        assert g["minReplicas"] <= g["maxReplicas"] <= full[name]["maxReplicas"]
    cpus, mib = minikube_size(minikube_manifest, cluster["minikube"])
    budget = cluster["minikube"]["budget"]
    assert cpus <= cpu_cores(budget["cpus"]) and mib * 2**20 <= memory_bytes(budget["memory"])
    cpu, mem = cluster_footprint(minikube_manifest, "maxReplicas")
    assert cpus >= cpu + 1 and mib * 2**20 >= mem + 2 * 2**30
    # One more pod of any group would not fit: the caps are the budget's, not lower.
    from kuberay.profile import _overrides

    mk_cluster, _ = _overrides(cluster, overlay.cluster_serve_config(load_config(), cluster))
    counts = {n: g["maxReplicas"] for n, g in groups.items()}
    for name in groups:
        if counts[name] < full[name]["maxReplicas"]:
            assert not fits_budget(mk_cluster, {**counts, name: counts[name] + 1})
    # The deployments' max_replicas pack into those pods.
    cfg = yaml.safe_load(minikube_manifest["spec"]["serveConfigV2"])
    reps = sizing.replicas(cfg)
    for g in mk_cluster["workerGroups"]:
        if g["name"] in groups:
            g["maxReplicas"] = groups[g["name"]]["maxReplicas"]
    sizing.pack(reps, sizing.placement(mk_cluster, reps, sizing.groups(mk_cluster)), "max_replicas")
    out = subprocess.run(
        [sys.executable, "-m", "kuberay.generate", "--print-minikube-size"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [int(x) for x in out] == [cpus, mib]


# -- minikube.sh -----------------------------------------------------------------------------
def test_minikube_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_minikube_script_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian package `shellcheck`; make test-tools)")
    result = subprocess.run(["shellcheck", "-x", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _dry_run(tmp_path: Path, *args: str, env: dict | None = None):
    # No minikube, helm, docker here: --dry-run must still print the whole sequence.
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    return subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_minikube_dry_run_prints_every_step_in_order(tmp_path):
    result = _dry_run(tmp_path, "up", env={"VISIONSERVE_API_KEY": "k"})
    assert result.returncode == 0, result.stdout + result.stderr
    calls = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    cpus, mib = subprocess.run(
        [sys.executable, "-m", "kuberay.generate", "--print-minikube-size"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    tag = gen.image_tag("source")
    expected = [
        f"minikube start -p visionserve --driver=docker --cpus={cpus} --memory={mib}mb",
        "helm repo add kuberay https://ray-project.github.io/kuberay-helm/",
        "helm upgrade --install kuberay-operator kuberay/kuberay-operator --version 1.7.0",
        f"minikube -p visionserve image build -t visionserve:{tag} -f kuberay/Dockerfile .",
        "kubectl --context visionserve delete job visionserve-fetch-models",
        "kubectl --context visionserve apply -f ",
        "kubectl --context visionserve wait --for=condition=complete job/visionserve-fetch-models",
        "kubectl --context visionserve create secret generic visionserve-api-key",
        "kubectl --context visionserve apply -f ",
        "kubectl --context visionserve get rayservice visionserve",
        "kubectl --context visionserve port-forward svc/visionserve-serve-svc ",
        "curl -fsS http://127.0.0.1:",
        "curl -fsS --max-time 120 --data-binary @",
    ]
    positions, start = [], 0
    for e in expected:
        i = next((i for i in range(start, len(calls)) if calls[i].startswith(e)), -1)
        assert i >= 0, f"{e!r} not found after position {start}:\n" + "\n".join(calls)
        positions.append(i)
        start = i + 1
    applied = [c.split()[-1] for c in calls if " apply -f " in c and c.endswith(".yaml")]
    assert [Path(p).name for p in applied] == ["models-job.yaml", "rayservice-minikube.yaml"]
    assert "k\n" not in result.stdout and "=k " not in result.stdout  # the key is not printed
    # The port is a free one, not 8000 (a local `make run` may be there).
    pf = next(c for c in calls if " port-forward " in c)
    port = int(pf.split()[-2].split(":")[0])
    assert port != 8000
    assert f"curl -fsS http://127.0.0.1:{port}/healthz" in calls


def test_minikube_checks_prerequisites_before_building(tmp_path):
    """Without the venv the script stops before minikube or a build, and says why."""
    fake = tmp_path / "repo"
    (fake / "kuberay").mkdir(parents=True)
    shutil.copy(SCRIPT, fake / "kuberay" / "minikube.sh")
    result = subprocess.run(
        ["bash", str(fake / "kuberay" / "minikube.sh"), "--dry-run", "up"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "make setup" in result.stderr and "stale" not in result.stderr
    assert "minikube start" not in result.stdout and "image build" not in result.stdout


def test_minikube_tells_a_stale_manifest_from_an_import_error(tmp_path):
    fake = tmp_path / "repo"
    shutil.copytree(
        REPO / "kuberay", fake / "kuberay", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(REPO / "config", fake / "config")
    shutil.copytree(
        REPO / "serve_app", fake / "serve_app", ignore=shutil.ignore_patterns("__pycache__")
    )
    (fake / ".venv").symlink_to(REPO / ".venv")
    (fake / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    script = ["bash", str(fake / "kuberay" / "minikube.sh"), "--dry-run", "up"]

    manifest = fake / "kuberay" / "rayservice.yaml"
    manifest.write_text(manifest.read_text() + "# edited\n")
    stale = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
    assert stale.returncode == 1 and "stale" in stale.stderr and "make kuberay" in stale.stderr

    (fake / "serve_app" / "app.py").write_text("import no_such_module_here\n")
    broken = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
    assert broken.returncode == 1 and "cannot import" in broken.stderr
    assert "no_such_module_here" in broken.stderr and "make kuberay" not in broken.stderr


_STUB = r"""#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
case "$(basename "$0") $*" in
  "docker info --format"*) echo "16 68719476736" ;;
  "minikube status"*) exit 1 ;;                      # not running yet
  "minikube -p visionserve image build"*) ls -A > "$STUB_LOG.context" ;;
  *'jsonpath={.status.conditions[?(@.type=="Ready")].status}'*) echo True ;;
  *" port-forward "*)
    port="${*: -1}"; port="${port%%:*}"
    echo $$ > "$STUB_LOG.pf"; echo "Forwarding from 127.0.0.1:$port -> 8000"; exec sleep 60 ;;
  "curl"*"/v1/detect/"*) echo '{"faces": []}' ;;
esac
exit 0
"""


def test_minikube_up_runs_against_stand_in_tools(tmp_path):
    """`up` for real, with stand-ins for docker, minikube, helm, kubectl and curl: the kubelet
    reservation from the host's size, the build context, /healthz through the port-forward
    before the request, and the port-forward stopped when the script exits."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("docker", "minikube", "helm", "kubectl", "curl"):
        (bin_dir / tool).write_text(_STUB)
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "STUB_LOG": str(log),
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "WAIT_S": "30",
    }
    result = subprocess.run(
        ["bash", str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text().splitlines()
    cpus, mib = (
        int(x)
        for x in subprocess.run(
            [sys.executable, "-m", "kuberay.generate", "--print-minikube-size"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    )
    start = next(c for c in calls if c.startswith("minikube start"))
    assert start == (
        f"minikube start -p visionserve --driver=docker --cpus={cpus} "
        f"--memory={mib}mb --extra-config=kubelet.system-reserved="
        f"cpu={(16 - cpus) * 1000}m,memory={65536 - mib}Mi"
    )
    context = set(Path(f"{log}.context").read_text().split())
    assert context - {"README.md"} == {".dockerignore", "kuberay", "pyproject.toml", "serve_app"}
    health = next(i for i, c in enumerate(calls) if c.startswith("curl") and "/healthz" in c)
    detect = next(i for i, c in enumerate(calls) if c.startswith("curl") and "/v1/detect/" in c)
    assert health < detect and ":8000/" not in calls[health]
    pf_pid = int(Path(f"{log}.pf").read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{pf_pid}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{pf_pid}").exists(), "port-forward left running"


def test_serve_downscale_tie_reproduction():
    """kuberay/downscale_tie.py: Ray Serve's own downscale choice keeps a replica on an added
    node when it ties with a baseline node (the cause of a stuck scale-down; docs). Fails
    when a Ray upgrade changes that: then the docs' note can go."""
    from kuberay.downscale_tie import reproduce

    assert reproduce() == {
        "stopped": ["detector-1", "detector-3", "detector-4"],
        "kept": ["detector-2"],
        "kept_on": ["C"],
        "nodes_still_busy": ["A", "B", "C"],
    }


def test_a_new_detector_needs_no_line_in_the_cluster_overlay(cluster, serve_cfg):
    """A model of a known kind gets its group and its cluster resources from its kind."""
    from kuberay.overlay import cluster_serve_config

    laptop = load_config()
    for name in ("yunet-face-detection", "face-detect-pigo"):
        assert name not in (cluster.get("placement") or {})
        assert name not in cluster["serve"]["deployments"]
    merged = {
        d["name"]: d
        for d in cluster_serve_config(laptop, cluster)["applications"][0]["deployments"]
    }
    detector = merged["yunet-face-detection"]["ray_actor_options"]
    assert (
        detector["num_cpus"]
        == cluster["serve"]["byKind"]["detector"]["ray_actor_options"]["num_cpus"]
    )
    assert detector["label_selector"] == {"visionserve.io/group": "cpu"}
    assert merged["yunet-face-detection"]["graceful_shutdown_timeout_s"] >= 30

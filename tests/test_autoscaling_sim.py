"""The RayService's autoscaling, simulated locally (kuberay/autoscaling_sim.py).

Runs in a subprocess with a Ray cluster of its own: this test session may already be connected
to another Ray (conftest's `ray_session`), and a process can hold only one connection. With the
shipped cluster config (overlay merged: max_replicas, num_cpus, label selectors, two routers)
and a small SAM on the `sam` node type: under load Serve must add replicas up to max_replicas
and the autoscaler nodes; without load both must go back to the baseline within the bounded
drain; no request may fail. The timeline is printed and written to the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kuberay.procs import stop_processes

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 480  # the driver bounds its phases to 150 + 45 + 150 s, plus cleanup


@pytest.mark.slow
def test_load_adds_replicas_and_nodes_and_idleness_removes_them(tmp_path):
    # Ray's socket paths live under its temp dir and must stay short: not pytest's tmp_path.
    sim_dir = Path(tempfile.mkdtemp(prefix="vs-sim-"))
    sim_id = os.urandom(8).hex()
    out = tmp_path / "autoscaling_timeline.json"
    cmd = [
        sys.executable,
        "-m",
        "kuberay.autoscaling_sim",
        "--temp-dir",
        str(sim_dir),
        "--sim-id",
        sim_id,
        "--out",
        str(out),
        "--drain-s",
        "150",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the driver stops its cluster on the way out
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"simulation did not finish in {TIMEOUT_S} s:\n{output[-3000:]}")
    finally:
        left = stop_processes(sim_id)  # normally none: the driver cleans up itself
        shutil.rmtree(sim_dir, ignore_errors=True)
    assert proc.returncode == 0, output[-3000:]
    assert left == 0
    report = json.loads(
        next(line[len("REPORT ") :] for line in output.splitlines() if line.startswith("REPORT "))
    )

    print(f"\nautoscaling timeline ({out}):")
    print(
        f"{'t/s':>6} {'phase':6} {'replicas':>8} {'starting':>8} {'nodes':>5} {'ok':>6} "
        f"{'failed':>6}"
    )
    for row in report["timeline"]:
        print(
            f"{row['t']:6.1f} {row['phase']:6} {row['replicas']:8d} {row['starting']:8d} "
            f"{row['worker_nodes']:5d} {row['requests_ok']:6d} {row['requests_failed']:6d}"
        )
    print("marks:", report["marks"])
    s = report["summary"]
    print("summary:", s)

    from kuberay import overlay, sizing
    from serve_app.config import load_config

    shipped = {
        d["name"]: d
        for d in overlay.cluster_serve_config(load_config(), sizing.load_cluster())["applications"][
            0
        ]["deployments"]
    }
    assert (
        report["marks"]["max_replicas"]
        == shipped[report["deployment"]]["autoscaling_config"]["max_replicas"]
    ), "the simulation must run the shipped max"
    # The small SAM runs on the sam node type, and only there is its CPU share used.
    sam_cpus = shipped["sam-mobile"]["ray_actor_options"]["num_cpus"]
    assert report["marks"]["placement"]["sam"]["cpus_used"] == sam_cpus
    assert s["requests_failed"] == 0, report["errors"]
    assert s["requests_ok"] > 0
    assert s["peak_replicas"] == report["marks"]["max_replicas"], "not scaled to max_replicas"
    assert s["peak_worker_nodes"] > s["baseline_worker_nodes"], "the autoscaler added no node"
    assert s["final_replicas"] == s["baseline_replicas"], "replicas stayed after the load"
    assert s["final_worker_nodes"] == s["baseline_worker_nodes"], "the added node stayed"

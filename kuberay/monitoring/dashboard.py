"""Write kuberay/monitoring/grafana-dashboard.json from the metric table in serve_app.metrics.

    python -m kuberay.monitoring.dashboard           # (re)write the dashboard
    python -m kuberay.monitoring.dashboard --check   # exit 1 if the committed one is stale

Every query names its metric through `serve_app.metrics.BY_NAME`, so a renamed or removed
metric fails here (KeyError) instead of leaving an empty panel; tests/test_metrics.py checks
that the committed file is current and that it queries only metrics the service exports.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from serve_app.metrics import BY_NAME

OUT = Path(__file__).resolve().parent / "grafana-dashboard.json"
UID = "visionserve"
WINDOW = "$__rate_interval"
MODEL = 'model=~"$model"'
NONE = MODEL + ',le="0.5"'  # counts are whole: le=0.5 holds the answers that found nothing
# Label names that look like metric names in a query (KubeRay pod labels via the PodMonitor).
LABELS = {"ray_io_cluster", "ray_io_node_type"}


def m(name: str, suffix: str = "") -> str:
    """The exported series name of a metric (KeyError if the table has no such metric)."""
    return BY_NAME[name].exported + suffix


def series(name: str, suffix: str = "", labels: str = MODEL) -> str:
    return m(name, suffix) + (f"{{{labels}}}" if labels else "")


def rate(name: str, suffix: str = "", labels: str = MODEL) -> str:
    return f"rate({series(name, suffix, labels)}[{WINDOW}])"


def quantile(q: float, name: str, by: str, labels: str = MODEL) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) ({rate(name, '_bucket', labels)}))"


def panel(
    title: str,
    targets: list[tuple[str, str]],
    unit: str,
    description: str = "",
) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom"},
            "tooltip": {"mode": "multi"},
        },
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def rows() -> list[dict[str, Any]]:
    return [
        row("Requests (router)"),
        panel(
            "Requests / s by model and status",
            [(f"sum by (model, status) ({rate('visionserve_requests')})", "{{model}} {{status}}")],
            "reqps",
        ),
        panel(
            "Refusals / s by reason",
            [(f"sum by (model, reason) ({rate('visionserve_refusals')})", "{{model}} {{reason}}")],
            "reqps",
            "4xx/5xx answers by the `error` code of their JSON body",
        ),
        panel(
            "Router latency (p50, p95)",
            [
                (quantile(0.5, "visionserve_request_seconds", "model"), "p50 {{model}}"),
                (quantile(0.95, "visionserve_request_seconds", "model"), "p95 {{model}}"),
            ],
            "s",
            "First byte in to last byte out at the router, by model",
        ),
        panel(
            "Model call latency (p95)",
            [
                (
                    quantile(0.95, "visionserve_model_call_seconds", "model, method"),
                    "{{model}} {{method}}",
                )
            ],
            "s",
            "Router to model deployment and back: queueing, transfer and the replica",
        ),
        panel(
            "Replica stages (p95)",
            [(quantile(0.95, "visionserve_stage_seconds", "model, stage"), "{{model}} {{stage}}")],
            "s",
            "Decode, inference and render inside a replica",
        ),
        panel(
            "Request bytes / s",
            [(f"sum by (model) ({rate('visionserve_request_bytes')})", "{{model}}")],
            "Bps",
        ),
        row("Answers (replicas)"),
        panel(
            "Faces or masks per answer",
            [
                (
                    quantile(0.5, "visionserve_objects_per_answer", "model, kind"),
                    "median {{model}}",
                ),
                (
                    f"sum by (model) ({rate('visionserve_objects_per_answer', '_bucket', NONE)})"
                    f" / sum by (model) ({rate('visionserve_objects_per_answer', '_count')})",
                    "share with none {{model}}",
                ),
            ],
            "short",
            "le=0.5 is the bucket of answers with no face or mask",
        ),
        panel(
            "Input size (megapixels)",
            [
                (quantile(0.5, "visionserve_input_megapixels", "model"), "p50 {{model}}"),
                (quantile(0.95, "visionserve_input_megapixels", "model"), "p95 {{model}}"),
            ],
            "short",
        ),
        panel(
            "Seconds since last event",
            [
                (
                    f"time() - max by (model, source) "
                    f"({series('visionserve_last_event_timestamp_seconds')})",
                    "{{model}} {{source}}",
                )
            ],
            "s",
            "Idle time per model: last request (router), answer (replica), finished job",
        ),
        row("URL inputs"),
        panel(
            "URL fetches / s by result",
            [(f"sum by (result) ({rate('visionserve_url_fetches', '', '')})", "{{result}}")],
            "reqps",
        ),
        panel(
            "URL fetch time (p95)",
            [(quantile(0.95, "visionserve_url_fetch_seconds", "result", ""), "{{result}}")],
            "s",
        ),
        row("Jobs"),
        panel(
            "Jobs queued and running",
            [(f"sum by (model, state) ({series('visionserve_jobs')})", "{{model}} {{state}}")],
            "short",
        ),
        panel(
            "Oldest job age",
            [
                (
                    f"max by (state) ({series('visionserve_job_oldest_age_seconds', '', '')})",
                    "{{state}}",
                )
            ],
            "s",
        ),
        panel(
            "Jobs finished / s by result",
            [
                (
                    f"sum by (model, result) ({rate('visionserve_jobs_finished')})",
                    "{{model}} {{result}}",
                )
            ],
            "reqps",
        ),
        panel(
            "Job run time (p95)",
            [(quantile(0.95, "visionserve_job_seconds", "model"), "{{model}}")],
            "s",
        ),
    ]


def layout(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows full width; panels two per line, 12 units wide, 8 high."""
    out, y, x = [], 0, 0
    for i, item in enumerate(items, start=1):
        if item["type"] == "row":
            y += 8 if x else 0
            x = 0
            out.append({**item, "id": i, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
            y += 1
            continue
        out.append({**item, "id": i, "gridPos": {"h": 8, "w": 12, "x": x, "y": y}})
        x = 12 - x
        y += 8 if x == 0 else 0
    return out


def build() -> dict[str, Any]:
    return {
        "uid": UID,
        "title": "visionserve",
        "description": "Generated by python -m kuberay.monitoring.dashboard from "
        "serve_app/metrics.py; do not edit by hand.",
        "tags": ["visionserve", "ray-serve"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                },
                {
                    "name": "model",
                    "label": "Model",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": f"label_values({m('visionserve_requests')}, model)",
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": layout(rows()),
    }


def queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return exprs + [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def referenced_metrics(dashboard: dict[str, Any]) -> set[str]:
    """Every `ray_...` series name the dashboard's queries use (label names excluded)."""
    names = {n for q in queries(dashboard) for n in re.findall(r"\bray_[a-z0-9_]+", q)}
    return names - LABELS


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != render():
            print(f"{OUT} is stale: run python -m kuberay.monitoring.dashboard", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

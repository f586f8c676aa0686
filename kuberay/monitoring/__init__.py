"""Prometheus and Grafana for a running RayService: a PodMonitor and a generated dashboard."""

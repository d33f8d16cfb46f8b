"""deploy/: the Grafana dashboard queries only series /metrics exposes; Prometheus and Grafana in the compose file."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from moescope.dashboard import prometheus

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "moescope.json"
METRIC_NAME = re.compile(r"\bmoescope_[a-z0-9_]+")


def _queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    return exprs + [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def _exposed_names(store) -> set[str]:
    """Every family /metrics declares (a family without samples now, such as alerts firing, is still declared)."""
    text = prometheus.exposition(prometheus.registry_for(store)).decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_dashboard_queries_only_series_the_exposition_has(recorded_store):
    dashboard = json.loads(DASHBOARD.read_text())
    used = {name for expr in _queries(dashboard) for name in METRIC_NAME.findall(expr)}
    exposed = _exposed_names(recorded_store)
    assert used and used <= exposed, sorted(used - exposed)
    # Every routing family reaches a panel.
    routing = {name for name in exposed if name.startswith("moescope_routing_") and not name.endswith("_total")}
    assert routing <= used, sorted(routing - used)


def test_dashboard_panels_use_the_provisioned_datasource_and_distinct_ids():
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    uid = re.search(r"uid:\s*(\S+)", datasource).group(1)
    targets = [t for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert targets and {t["datasource"]["uid"] for t in targets} == {uid}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_config_passes_promtool_check_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("needs promtool (Debian package `prometheus`)")
    out = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_runs_prometheus_scraping_the_server_and_grafana_provisioned_from_deploy():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose binary not installed")
    yaml = pytest.importorskip("yaml")
    env = {**os.environ, "MOESCOPE_REDIS_PASSWORD": "s3cret"}
    out = subprocess.run([binary, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    mounts = {name: {_mount(v) for v in services[name]["volumes"]} for name in ("prometheus", "grafana")}
    assert (str(DEPLOY / "prometheus" / "prometheus.yml"), "/etc/prometheus/prometheus.yml") in mounts["prometheus"]
    assert (str(DEPLOY / "grafana" / "provisioning"), "/etc/grafana/provisioning") in mounts["grafana"]
    assert (str(DEPLOY / "grafana" / "dashboards"), "/var/lib/grafana/dashboards") in mounts["grafana"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    server_port = _port(services["server"]["ports"][0])[2]
    assert scrape["static_configs"][0]["targets"] == [f"server:{server_port}"] and scrape["metrics_path"] == "/metrics"
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "moescope.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    for name in ("prometheus", "grafana"):
        assert all(_port(p)[0] == "127.0.0.1" for p in services[name]["ports"]), services[name]["ports"]


def _mount(volume) -> tuple[str, str]:
    """(source, target) of a volume in either compose syntax (docker-compose v1 prints `src:dst[:mode]`)."""
    if isinstance(volume, dict):
        return volume["source"], volume["target"]
    source, target = volume.split(":")[:2]
    return source, target


def _port(port) -> tuple[str, int, int]:
    """(host ip, published, target) of a port in either compose syntax."""
    if isinstance(port, dict):
        return str(port.get("host_ip")), int(port["published"]), int(port["target"])
    host_ip, published, target = str(port).split("/")[0].rsplit(":", 2)
    return host_ip, int(published), int(target)

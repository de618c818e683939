"""deploy/monitoring: the alert rules load in promtool, and every metric they and the
dashboard name is one the code exports (the list comes from the real registries)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca.metrics import CaMetrics, Live, RootSnapshot
from meshid.clock import ManualClock
from sidecar.metrics import Gauges, Metrics
from sidecar.registry import Registry

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
RULES = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
# A name of ours or of prometheus_client's process collector, wherever it sits in PromQL.
METRIC = re.compile(r"\b((?:meshid|process|python)_[a-z0-9_]+)\b")
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
}


def exported_names() -> set[str]:
    """Every series name the sidecar and the authority can expose, optional ones included."""
    sidecar = Metrics(
        Gauges(
            registry=Registry(),
            svid_seconds_left=lambda: 60.0,
            policy_version=lambda: 1,
            bundle_sequence=lambda: 1,
            quarantined=lambda: 0,
            state_dir_writable=lambda: True,
            state_write_failures=lambda: {"svid": 0},
            ready=lambda: True,
        )
    )
    now = datetime.now(UTC)
    authority = CaMetrics(ManualClock(now), Live(lambda: {"anonymous": 0}, lambda: 0))
    authority.root = RootSnapshot(1, now + timedelta(days=1), "none")
    names: set[str] = set()
    for registry in (sidecar.registry, authority.registry):
        for family in registry.collect():
            names.add(family.name)
            names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
    return names


def test_the_registries_export_what_the_alerts_are_about() -> None:
    names = exported_names()
    for name in (
        "meshid_ca_root_expiry_seconds",
        "meshid_state_dir_writable",
        "meshid_ready",
        "meshid_svid_renewals_total",
        "meshid_ca_refusals_total",
        "meshid_handshake_seconds_bucket",
        "meshid_build_info",
        "process_resident_memory_bytes",
    ):
        assert name in names


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_metric_an_alert_names_exists() -> None:
    names = exported_names()
    seen: set[str] = set()
    for rule in rules():
        used = set(METRIC.findall(rule["expr"]))
        assert used or "up{" in rule["expr"], rule["alert"]
        assert used <= names, (rule["alert"], used - names)
        seen |= used
    for needed in (
        "meshid_ca_root_expiry_seconds",
        "meshid_svid_renewals_total",
        "meshid_ca_refusals_total",
        "meshid_ready",
        "meshid_state_dir_writable",
    ):
        assert needed in seen, f"no alert on {needed}"


def test_the_root_alerts_fire_at_30_and_7_days() -> None:
    by_name = {rule["alert"]: rule for rule in rules()}
    assert "< 30 * 86400" in by_name["MeshidRootExpiresWithin30Days"]["expr"]
    assert "< 7 * 86400" in by_name["MeshidRootExpiresWithin7Days"]["expr"]
    assert by_name["MeshidRootExpiresWithin7Days"]["labels"]["severity"] == "critical"
    for rule in by_name.values():
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool absent: `make system-packages` installs Debian's prometheus package",
)
def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_the_dashboard_has_the_expected_shape() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = exported_names()
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            found = set(METRIC.findall(target["expr"]))
            assert found, (panel["title"], target["expr"])
            assert found <= names, (panel["title"], found - names)
            used |= found
    # The headline series each have a panel.
    for needed in (
        "meshid_ca_root_expiry_seconds",
        "meshid_ca_enrollments_total",
        "meshid_ca_db_call_seconds_bucket",
        "meshid_handshake_seconds_bucket",
        "meshid_connect_seconds_bucket",
        "meshid_build_info",
    ):
        assert needed in used, f"no panel shows {needed}"


def test_a_misspelt_metric_would_be_caught() -> None:
    assert "meshid_ca_root_expiry_second" not in exported_names()
    assert set(METRIC.findall("rate(meshid_nope_total[5m]) > 0")) == {"meshid_nope_total"}

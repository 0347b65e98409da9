"""deploy/grafana/zipserve.json: valid Grafana dashboard JSON whose queries name only metrics the
router exports (router/metrics.py), and that shows every metric family the router exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from zipserve.router.metrics import RouterMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "zipserve.json"
METRIC = re.compile(r"\bzipserve_[a-zA-Z0-9_]+")


def queries(dash: dict) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_grafana_dashboard_queries_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "codec"} <= variables
    for p in dash["panels"]:
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]

    exported = RouterMetrics().metric_names()
    used = {name for expr in queries(dash) for name in METRIC.findall(expr)}
    assert used, "no zipserve metric queried"
    assert used <= exported, f"queried but not exported: {sorted(used - exported)}"
    families = {f.name for f in RouterMetrics().registry.collect()}
    suffixes = ("", "_total", "_bucket", "_sum", "_count")
    unshown = {f for f in families if not any(f + sfx in used for sfx in suffixes)}
    assert not unshown, f"exported but on no panel: {sorted(unshown)}"

"""Alert rules and the Grafana dashboard only use metric names that the services
really export: the three services run as processes and /metrics is scraped."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from libs.common.server import wait_for_serving
from tests.conftest import free_port, write_keys
from tests.deploy.conftest import ROOT

RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "finsight-dashboard.json"
RUNBOOK = ROOT / "docs" / "runbook.md"
SERVICES = ("llm_gateway", "memory", "analytics")
# Written by Prometheus itself for every target, not by a service.
PROMETHEUS_NAMES = {"up"}
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}
_PROMQL_WORDS = set(
    """sum min max avg count stddev stdvar topk bottomk quantile count_values group by without
    on ignoring group_left group_right and or unless bool offset rate irate increase delta idelta
    histogram_quantile abs clamp_min clamp_max label_replace label_values vector scalar time
    absent changes resets deriv predict_linear avg_over_time max_over_time min_over_time
    sum_over_time count_over_time inf nan""".split()  # noqa: SIM905
)


def exported_names(text: str) -> set[str]:
    """Every series name a scrape can contain, including families with no samples yet."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names used in a PromQL expression (no full parser: strip the rest)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)  # Grafana variables
    tokens = re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr)
    return {t for t in tokens if t not in _PROMQL_WORDS}


def rule_exprs() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r["expr"] for g in groups for r in g["rules"]}


def dashboard_exprs() -> dict[str, str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {f"{p['title']}/{t['refId']}": t["expr"] for p in panels for t in p.get("targets", [])}


@pytest.fixture(scope="module")
def scraped(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Start each service as `python -m services.X` (its real entry point) and scrape it."""
    tmp = tmp_path_factory.mktemp("observability")
    keys_file = tmp / "keys.json"
    write_keys(keys_file)
    procs: dict[str, tuple[subprocess.Popen[bytes], int, int]] = {}
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FINSIGHT_", "OTEL_", "REDIS_"))
    }
    for service in SERVICES:
        grpc_port, metrics_port = free_port(), free_port()
        prefix = service.upper()
        env_s = env | {
            "FINSIGHT_DATA_DIR": str(tmp / service),
            "REDIS_URL": redis_url,
            "FINSIGHT_API_KEYS_FILE": str(keys_file),
            "FINSIGHT_DRAIN_DELAY_S": "0",
            f"{prefix}_GRPC_PORT": str(grpc_port),
            f"{prefix}_METRICS_PORT": str(metrics_port),
            "PYTHONPATH": str(ROOT),
        }
        log = (tmp / f"{service}.log").open("wb")
        # cwd=tmp: the services read `.env` from the working directory.
        procs[service] = (
            subprocess.Popen(
                [sys.executable, "-m", f"services.{service}"],
                cwd=tmp,
                env=env_s,
                stdout=log,
                stderr=subprocess.STDOUT,
            ),
            grpc_port,
            metrics_port,
        )
    try:
        out = {}
        for service, (proc, grpc_port, metrics_port) in procs.items():
            deadline = time.monotonic() + 60
            while True:
                try:
                    asyncio.run(wait_for_serving(f"127.0.0.1:{grpc_port}", timeout=5))
                    break
                except TimeoutError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log_text = (tmp / f"{service}.log").read_text()[-3000:]
                        pytest.fail(f"{service} did not start:\n{log_text}")
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
                out[service] = r.read().decode()
        yield out
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, _ in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_alert_and_dashboard_metrics_are_exported(scraped: dict[str, str]) -> None:
    exported = set().union(*(exported_names(text) for text in scraped.values()))
    assert "grpc_server_handled_total" in exported
    missing = {}
    for where, expr in {**rule_exprs(), **dashboard_exprs()}.items():
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        unknown = names - exported - PROMETHEUS_NAMES
        if unknown:
            missing[where] = sorted(unknown)
    assert not missing, f"metrics no running service exports: {missing}"


def test_the_name_extractor_sees_through_promql() -> None:
    expr = (
        'sum by (grpc_service, le) (rate(grpc_server_handling_seconds_bucket{grpc_code=~"A|B",'
        ' x="sum(y)"}[5m])) / on (pod) group_left max(finsight_service_ready) > bool 0.5'
    )
    assert metric_names(expr) == {"grpc_server_handling_seconds_bucket", "finsight_service_ready"}


def test_grpc_code_matchers_name_real_status_codes() -> None:
    codes = {c.name for c in grpc.StatusCode}
    for where, expr in {**rule_exprs(), **dashboard_exprs()}.items():
        for pattern in re.findall(r'grpc_code=~?"([^"]+)"', expr):
            for code in pattern.split("|"):
                assert code in codes, f"{where}: {code} is not a grpc.StatusCode name"


def test_every_alert_has_severity_summary_and_a_runbook_section() -> None:
    runbook = RUNBOOK.read_text().lower()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h).strip().replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", runbook, flags=re.M)
    }
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            assert rule["annotations"]["summary"]
            link = rule["annotations"]["runbook"]
            assert link == f"docs/runbook.md#{rule['alert'].lower()}", link
            assert rule["alert"].lower() in anchors, (
                f"docs/runbook.md has no section {rule['alert']}"
            )


def test_dashboard_is_importable_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in dash["templating"]["list"]}
    for where, expr in dashboard_exprs().items():
        for var in re.findall(r"\$(\w+)", expr):
            assert var in names | {"__rate_interval", "__interval", "__range"}, where

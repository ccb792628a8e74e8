"""Alert rules and the Grafana dashboard only use metric names that the services
really export: the three services run as processes, the backup CronJobs' command
runs against memory and analytics, and /metrics is scraped."""

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from libs.common.server import wait_for_serving
from tests.conftest import Keys, free_port, write_keys
from tests.deploy.conftest import (
    BACKUP_JOBS,
    ROOT,
    Rendered,
    pod_environment,
    pod_spec,
    secrets_by_name,
)

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


def _rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def rule_exprs() -> dict[str, str]:
    """Each alert's expression, by alert name."""
    return {r["alert"]: r["expr"] for r in _rules() if "alert" in r}


def recording_rules() -> list[dict[str, Any]]:
    return [r for r in _rules() if "record" in r]


def recorded_names() -> set[str]:
    return {r["record"] for r in recording_rules()}


def dashboard_exprs() -> dict[str, str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {f"{p['title']}/{t['refId']}": t["expr"] for p in panels for t in p.get("targets", [])}


@dataclass
class Observed:
    """The running services: their scrapes (taken after the backup jobs ran) and ports."""

    metrics: dict[str, str]
    grpc_ports: dict[str, int]
    backup_dirs: dict[str, Path]
    backup_output: dict[str, str]
    keys: Keys
    tmp: Path


def backup_job_run(
    dev: Rendered, job: str, grpc_port: int, tmp: Path, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the dev overlay's backup CronJob container as it is rendered (command, env,
    mounted Secret), with only its `dns:///service:port` target pointed at 127.0.0.1."""
    cron = dev.get("CronJob", job)
    (c,) = pod_spec(cron)["containers"]
    env = pod_environment(dev, "dev", cron, tmp / job)
    if key is not None:
        Path(env["FINSIGHT_API_KEY_FILE"]).write_text(key)
    command = list(c["command"])
    at = command.index("--target") + 1
    host = command[at].removeprefix("dns:///").rpartition(":")[0]
    assert host == BACKUP_JOBS[job]
    command[at] = f"127.0.0.1:{grpc_port}"
    assert command[0] == "python"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FINSIGHT_", "OTEL_"))}
    return subprocess.run(
        [sys.executable, *command[1:]],
        env=base | env | {"PYTHONPATH": str(ROOT)},
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def observed(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, overlays: dict[str, Rendered]
) -> Iterator[Observed]:
    """Start each service as `python -m services.X` (its real entry point), run the
    backup CronJobs' command against memory and analytics (the backup gauges exist
    only once a backup succeeded), then scrape every service."""
    tmp = tmp_path_factory.mktemp("observability")
    dev = overlays["dev"]
    keys_file = tmp / "keys.json"
    keys = write_keys(keys_file)
    # The dev overlay's keys too: the backup job presents the dev backup key,
    # so its keys.json entry must grant exactly what Backup requires.
    dev_keys = json.loads(secrets_by_name(dev, "dev")["finsight-api-keys"]["keys.json"])
    test_keys = json.loads(keys_file.read_text())
    keys_file.write_text(json.dumps({"keys": test_keys["keys"] + dev_keys["keys"]}))
    procs: dict[str, tuple[subprocess.Popen[bytes], int, int]] = {}
    backup_dirs: dict[str, Path] = {}
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
        if service in BACKUP_JOBS.values():
            # As the StatefulSet sets it: its own backups volume, not under the data dir.
            backup_dirs[service] = tmp / f"{service}-backups"
            env_s["FINSIGHT_BACKUP_DIR"] = str(backup_dirs[service])
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
        for service, (proc, grpc_port, _) in procs.items():
            deadline = time.monotonic() + 60
            while True:
                try:
                    asyncio.run(wait_for_serving(f"127.0.0.1:{grpc_port}", timeout=5))
                    break
                except TimeoutError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log_text = (tmp / f"{service}.log").read_text()[-3000:]
                        pytest.fail(f"{service} did not start:\n{log_text}")
        backup_output = {}
        for job, service in BACKUP_JOBS.items():
            done = backup_job_run(dev, job, procs[service][1], tmp)
            assert done.returncode == 0, f"{job}: {done.stdout}{done.stderr}"
            backup_output[service] = done.stdout
        metrics = {}
        for service, (_, _, metrics_port) in procs.items():
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
                metrics[service] = r.read().decode()
        yield Observed(
            metrics=metrics,
            grpc_ports={s: g for s, (_, g, _) in procs.items()},
            backup_dirs=backup_dirs,
            backup_output=backup_output,
            keys=keys,
            tmp=tmp,
        )
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, _ in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_alert_and_dashboard_metrics_are_exported(observed: Observed) -> None:
    """Recording rules read exported series only (the error budgets are constants);
    alerts and panels read exported or recorded ones."""
    exported = set().union(*(exported_names(text) for text in observed.metrics.values()))
    assert "grpc_server_handled_total" in exported
    recorded = recorded_names()
    missing = {}
    for rule in recording_rules():
        where = f"{rule['record']}{rule.get('labels', {})}"
        unknown = metric_names(rule["expr"]) - exported - PROMETHEUS_NAMES
        if unknown:
            missing[where] = sorted(unknown)
    for where, expr in {**rule_exprs(), **dashboard_exprs()}.items():
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        unknown = names - exported - PROMETHEUS_NAMES - recorded
        if unknown:
            missing[where] = sorted(unknown)
    assert not missing, f"metrics no running service exports: {missing}"


def test_recording_rules_are_named_and_used() -> None:
    """`level:metric:operations` names (Prometheus' convention), each recorded series read
    by an alert, and no two rules writing the same series."""
    used = set().union(*(metric_names(e) for e in rule_exprs().values()))
    seen = set()
    for rule in recording_rules():
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]
        assert rule["record"] in used, f"{rule['record']} is recorded but no alert reads it"
        key = (rule["record"], tuple(sorted(rule.get("labels", {}).items())))
        assert key not in seen, f"{key} is recorded twice"
        seen.add(key)
        assert "alert" not in rule and "annotations" not in rule and "for" not in rule


def test_rule_expressions_are_balanced() -> None:
    """No PromQL parser ships with the dev tools (promtool is not installed): catch the
    typos a parser would, brackets and quotes that do not pair up."""
    pairs = {")": "(", "]": "[", "}": "{"}
    for rule in _rules():
        expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', rule["expr"])
        assert '"' not in expr.replace('""', ""), f"unclosed string in {rule}"
        stack: list[str] = []
        for ch in expr:
            if ch in "([{":
                stack.append(ch)
            elif ch in pairs:
                assert stack and stack.pop() == pairs[ch], f"unbalanced {ch!r} in {rule}"
        assert not stack, f"unclosed {stack} in {rule}"


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
            if "record" in rule:
                continue
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


def test_backup_jobs_leave_a_restorable_backup_and_a_fresh_gauge(observed: Observed) -> None:
    """What FinsightBackupTooOld watches: each stateful service exports the time of its own
    last successful backup, and the file the job reports is a complete database."""
    for service, backup_dir in observed.backup_dirs.items():
        files = sorted(backup_dir.glob(f"{service}-*.duckdb"))
        assert len(files) == 1, files
        assert f"backup written: {files[0]}" in observed.backup_output[service]
        conn = duckdb.connect(str(files[0]), read_only=True)
        try:
            applied = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
        finally:
            conn.close()
        assert applied is not None and applied[0] >= 1
        samples = {
            s.labels["db"]: s.value
            for family in text_string_to_metric_families(observed.metrics[service])
            for s in family.samples
            if s.name == "finsight_backup_last_success_timestamp_seconds"
        }
        assert set(samples) == {service}, f"{service} exports backup times for {samples}"
        assert time.time() - 120 < samples[service] <= time.time()


def test_backup_job_fails_without_the_admin_scope(
    observed: Observed, overlays: dict[str, Rendered]
) -> None:
    """The Job's success is the client's exit code: a key without `memory.admin`
    (alice has plain `memory`) is refused, the client exits non-zero, no file is written."""
    before = sorted(observed.backup_dirs["memory"].iterdir())
    done = backup_job_run(
        overlays["dev"],
        "memory-backup",
        observed.grpc_ports["memory"],
        observed.tmp / "denied",
        key=observed.keys.alice,
    )
    assert done.returncode != 0
    assert "PERMISSION_DENIED" in done.stderr
    assert sorted(observed.backup_dirs["memory"].iterdir()) == before


# -- SLOs per RPC class (docs/deployment.md, "Service level objectives") ----------------------

SLO_CLASSES = ("read", "compute", "write", "llm")
SLO_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
SLO_SLIS = {"finsight:slo_errors": "availability", "finsight:slo_slow": "latency"}
# RPCs in no SLO class: operator calls and the bulk export (docs/deployment.md says why).
SLO_EXCLUDED = {"Backup", "PurgeExpired", "ExportUserData"}
# The workbook's pairs: (burn rate, long window, short window) per alert.
SLO_BURNS = {
    "Fast": {(14.4, "1h", "5m"), (6.0, "6h", "30m")},
    "Slow": {(3.0, "1d", "2h"), (1.0, "3d", "6h")},
}


def finsight_rpcs() -> dict[str, bool]:
    """Every RPC of the Finsight protos: method name -> unary (neither side streams)."""
    from finsight.analytics.v1 import analytics_pb2
    from finsight.common.v1 import admin_pb2
    from finsight.llm.v1 import llm_gateway_pb2
    from finsight.memory.v1 import memory_pb2

    rpcs = {}
    for module in (analytics_pb2, admin_pb2, llm_gateway_pb2, memory_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                assert m.name not in rpcs, f"{m.name} is in two services: classes need a label"
                rpcs[m.name] = not (m.client_streaming or m.server_streaming)
    return rpcs


def _slo_methods(expr: str) -> set[str]:
    found = {m for m in re.findall(r'grpc_method=~"([^"]+)"', expr)}
    assert len(found) == 1, f"one grpc_method set per rule, got {found}"
    return set(found.pop().split("|"))


def slo_ratio_rules() -> dict[tuple[str, str, str], dict[str, Any]]:
    """(recorded metric without window, class, window) -> rule."""
    out = {}
    for rule in recording_rules():
        metric, _, window = rule["record"].rpartition(":ratio_rate")
        if metric in SLO_SLIS:
            key = (metric, rule["labels"]["slo_class"], window)
            assert key not in out, key
            out[key] = rule
    return out


def test_slo_classes_cover_every_rpc_once() -> None:
    """Each class has a ratio per window for both SLIs over the same methods; the classes
    are disjoint and, with the excluded operator RPCs, name every RPC of the protos; the
    latency ratios count unary calls only, each class at one threshold for every window."""
    rules = slo_ratio_rules()
    assert set(rules) == {(m, c, w) for m in SLO_SLIS for c in SLO_CLASSES for w in SLO_WINDOWS}
    rpcs = finsight_rpcs()
    classes: dict[str, set[str]] = {}
    for (metric, cls, window), rule in rules.items():
        expr = rule["expr"]
        assert set(re.findall(r"\[(\w+)\]", expr)) == {window}, rule["record"]
        methods = _slo_methods(expr)
        assert classes.setdefault(cls, methods) == methods, f"{cls}: {rule['record']}"
        assert set(rule["labels"]) == {"slo_class"}
        assert "sum by (namespace, grpc_service)" in expr
        if SLO_SLIS[metric] == "latency":
            assert expr.count('grpc_type="unary"') == 2, rule["record"]
            les = {
                le
                for (m, c, _), r in rules.items()
                if c == cls and SLO_SLIS[m] == "latency"
                for le in re.findall(r"le=~?\"([^\"]+)\"", r["expr"])
            }
            assert len(les) == 1, f"{cls}: latency thresholds {les}"
            assert any(rpcs[m] for m in methods), f"{cls}: no unary RPC to time"
        else:
            codes = re.findall(r'grpc_code=~"([^"]+)"', expr)
            assert codes == [
                rule_exprs()["FinsightHighErrorRatio"].split('grpc_code=~"')[1].split('"')[0]
            ], "server-side codes as FinsightHighErrorRatio"
    named = [m for methods in classes.values() for m in methods]
    assert len(named) == len(set(named)), f"an RPC in two classes: {sorted(named)}"
    assert set(named) | SLO_EXCLUDED == set(rpcs), (
        f"not classified: {sorted(set(rpcs) - set(named) - SLO_EXCLUDED)}; "
        f"not an RPC: {sorted(set(named) - set(rpcs))}"
    )
    assert not set(named) & SLO_EXCLUDED
    budgets = {
        (r["labels"]["slo_class"], r["labels"]["sli"]): r["expr"]
        for r in recording_rules()
        if r["record"] == "finsight:slo_error_budget:ratio"
    }
    assert set(budgets) == {(c, s) for c in SLO_CLASSES for s in SLO_SLIS.values()}
    for expr in budgets.values():
        value = float(re.fullmatch(r"vector\(([\d.]+)\)", expr.strip())[1])  # type: ignore[index]
        assert 0 < value < 0.05


def test_slo_alerts_pair_a_long_and_a_short_window() -> None:
    """Every burn-rate alert ORs the workbook's two window pairs, each pair the same
    burn rate on a long window and on one 1/12 as long, of one SLI."""
    arm = re.compile(
        r"(finsight:slo_\w+):ratio_rate(\w+) > on \(slo_class\) group_left \(\) "
        r'\(([\d.]+) \* finsight:slo_error_budget:ratio\{sli="(\w+)"\}\)'
    )
    seconds = {"m": 60, "h": 3600, "d": 86400}
    alerts = {a: e for a, e in rule_exprs().items() if "BudgetBurn" in a}
    assert sorted(alerts) == sorted(
        f"Finsight{sli}BudgetBurn{speed}" for sli in ("Error", "Latency") for speed in SLO_BURNS
    )
    for name, expr in alerts.items():
        found = arm.findall(expr)
        assert len(found) == 4 and re.findall(r"^or$", expr, re.M) == ["or"], name
        metrics = {m for m, _, _, _ in found}
        (metric,) = metrics
        assert {s for _, _, _, s in found} == {SLO_SLIS[metric]}, name
        assert (SLO_SLIS[metric] == "latency") == name.startswith("FinsightLatency")
        pairs = set()
        for (_, long, f1, _), (_, short, f2, _) in zip(found[::2], found[1::2], strict=True):
            assert f1 == f2, name
            assert seconds[long[-1]] * int(long[:-1]) == 12 * seconds[short[-1]] * int(short[:-1])
            pairs.add((float(f1), long, short))
        assert pairs == SLO_BURNS[name.rsplit("BudgetBurn", 1)[1]], name


def _prometheus3_le(value: str) -> str:
    """How Prometheus 3 stores a classic bucket's `le` (normalised: 60.0 -> 60)."""
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


def test_slo_latency_thresholds_are_histogram_buckets(observed: Observed) -> None:
    """A latency SLI counts the calls in its threshold's bucket: the threshold must be a
    bucket boundary of grpc_server_handling_seconds as exported, and the matcher must find
    it in both spellings (the client's `60.0`, Prometheus 3's `60`)."""
    exported = {
        s.labels["le"]
        for text in observed.metrics.values()
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "grpc_server_handling_seconds_bucket"
    }
    assert exported and "+Inf" in exported
    for (metric, cls, window), rule in slo_ratio_rules().items():
        if SLO_SLIS[metric] != "latency":
            continue
        ((op, pattern),) = set(re.findall(r'le(=~?)"([^"]+)"', rule["expr"]))
        pattern = pattern.replace("\\\\", "\\")
        hits = [
            le
            for le in exported
            if all(
                (re.fullmatch(pattern, form) if op == "=~" else form == pattern)
                for form in (le, _prometheus3_le(le))
            )
        ]
        assert len(hits) == 1, f"{cls} {window}: le{op}{pattern!r} matches buckets {hits}"

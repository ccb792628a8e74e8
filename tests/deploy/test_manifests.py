"""Every overlay renders, passes strict schema validation for the oldest and newest
supported Kubernetes, and meets the workload policies (tests/deploy/policy.py: probes
on servers, bounded run time on jobs, limits, restricted security, service accounts,
image tags), plus named ports, drain time, budgets and, in DuckDB mode, the backup
volume and schedule (PostgreSQL mode: tests/deploy/test_postgres.py)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from libs.common.envdoc import settings_models
from tests.deploy.conftest import (
    BACKUP_JOBS,
    DUCKDB_OVERLAYS,
    FINSIGHT,
    K8S_VERSIONS,
    OVERLAYS,
    POSTGRES_OVERLAYS,
    ROOT,
    STORES,
    Rendered,
    app_name,
    job_spec,
    pod_labels,
    pod_spec,
    run,
    tool,
)
from tests.deploy.policy import workload_problems

MODELS = {m.service_name: m for m in settings_models()}


def _validate(files: list[Path], version: str, *, check: bool = True) -> Any:
    return run(
        tool("kubernetes-validate"),
        "--strict",
        "--quiet",
        "-k",
        version,
        *map(str, files),
        check=check,
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlays_pass_strict_schema_validation(
    overlays: dict[str, Rendered], version: str, tmp_path: Path
) -> None:
    files = []
    for name, rendered in overlays.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(rendered.text)
        files.append(path)
    _validate(files, version)


def test_strict_validation_rejects_an_unknown_field(
    overlays: dict[str, Rendered], tmp_path: Path
) -> None:
    """The validator really is strict (a check that cannot fail would prove nothing)."""
    doc = overlays["prod"].get("Deployment", "llm-gateway")
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpcc"] = {}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    proc = _validate([path], K8S_VERSIONS[0], check=False)
    assert proc.returncode != 0, proc.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_has_the_finsight_workloads(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    r = overlays[overlay]
    r.get("Deployment", "llm-gateway")
    r.get("HorizontalPodAutoscaler", "llm-gateway")
    for name in STORES:
        if overlay in DUCKDB_OVERLAYS:
            sts = r.get("StatefulSet", name)
            assert sts["spec"]["replicas"] == 1, "one process per DuckDB file"
            assert sts["spec"]["volumeClaimTemplates"], f"{name}: no PVC for the DuckDB file"
            svc = r.get("Service", sts["spec"]["serviceName"])
            assert svc["spec"].get("clusterIP") == "None", (
                f"{name}: governing Service must be headless"
            )
        else:
            assert overlay in POSTGRES_OVERLAYS
            r.get("Deployment", name)
            r.get("HorizontalPodAutoscaler", name)
            assert not [s for s in r.of_kind("StatefulSet") if s["metadata"]["name"] == name]
    for name in FINSIGHT:
        r.get("PodDisruptionBudget", name)
        svc = r.get("Service", name)
        assert svc["spec"].get("clusterIP") == "None", f"{name}: clients round-robin over DNS"
    namespaces = r.of_kind("Namespace")
    assert len(namespaces) == 1
    labels = namespaces[0]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(
        d["metadata"].get("namespace") == namespaces[0]["metadata"]["name"]
        for d in r.docs
        if d["kind"] != "Namespace"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_is_a_server_or_a_job(overlays: dict[str, Rendered], overlay: str) -> None:
    """Pods only through the known kinds, so every pod is checked as one class or the other."""
    r = overlays[overlay]
    bare = [
        d["kind"] for d in r.docs if d["kind"] in ("Pod", "ReplicaSet", "ReplicationController")
    ]
    assert not bare, f"{overlay}: pods outside a Deployment/StatefulSet/Job: {bare}"
    assert len(r.workloads()) == len(r.servers()) + len(r.jobs())
    # The only jobs are DuckDB mode's backups (PostgreSQL's are the database operator's).
    expected = set(BACKUP_JOBS) if overlay in DUCKDB_OVERLAYS else set()
    assert {app_name(w) for w in r.jobs()} == expected, "unexpected or missing jobs"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_limits_and_restricted_security(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    problems = [p for w in overlays[overlay].workloads() for p in workload_problems(w)]
    assert not problems, "\n".join(problems)


def test_the_policy_check_tells_servers_from_jobs(overlays: dict[str, Rendered]) -> None:
    """A probe-less server and a job with a probe, a port or no deadline are both caught."""
    r = overlays["dev"]
    server = yaml.safe_load(yaml.safe_dump(r.get("StatefulSet", "memory")))
    del server["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert workload_problems(server) == ["StatefulSet/memory/memory: no readinessProbe"]
    job = yaml.safe_load(yaml.safe_dump(r.get("CronJob", "memory-backup")))
    spec = job["spec"]["jobTemplate"]["spec"]
    c = spec["template"]["spec"]["containers"][0]
    c["livenessProbe"] = {"grpc": {"port": 50052}}
    c["ports"] = [{"name": "grpc", "containerPort": 50052}]
    del spec["activeDeadlineSeconds"]
    job["spec"]["concurrencyPolicy"] = "Allow"
    assert sorted(workload_problems(job)) == [
        "CronJob/memory-backup/backup: a job container has livenessProbe",
        "CronJob/memory-backup/backup: a job container has ports",
        "CronJob/memory-backup: concurrencyPolicy must be Forbid",
        "CronJob/memory-backup: needs activeDeadlineSeconds",
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_accounts_exist_and_do_not_mount_tokens(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    r = overlays[overlay]
    accounts = {sa["metadata"]["name"]: sa for sa in r.of_kind("ServiceAccount")}
    used = [pod_spec(w)["serviceAccountName"] for w in r.workloads()]
    assert len(used) == len(set(used)), "one ServiceAccount per workload"
    for name in used:
        assert name in accounts, f"ServiceAccount {name} is not rendered"
        assert accounts[name].get("automountServiceAccountToken") is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_finsight_containers_probe_the_documented_health_names(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    r = overlays[overlay]
    config = r.config()
    drain = float(config["FINSIGHT_DRAIN_DELAY_S"]) + float(config["FINSIGHT_SHUTDOWN_GRACE_S"])
    for name, service in FINSIGHT.items():
        w = next(w for w in r.workloads() if app_name(w) == name)
        model = MODELS[service]
        spec = pod_spec(w)
        (c,) = spec["containers"]
        assert c["command"] == ["python", "-m", f"services.{service}"]
        grpc_port = int(config[f"{service.upper()}_GRPC_PORT"])
        metrics_port = int(config[f"{service.upper()}_METRICS_PORT"])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": grpc_port, "metrics": metrics_port}
        assert c["livenessProbe"]["grpc"] == {"port": grpc_port, "service": "liveness"}
        assert c["startupProbe"]["grpc"] == {"port": grpc_port, "service": "liveness"}
        assert c["readinessProbe"]["grpc"] == {
            "port": grpc_port,
            "service": model.full_service_name,
        }
        # The drain must finish before SIGKILL, with room for closing the database.
        assert spec["terminationGracePeriodSeconds"] >= drain + 10, name
        annotations = w["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(metrics_port)
        assert annotations["prometheus.io/path"] == "/metrics"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert config["FINSIGHT_DATA_DIR"] in mounts, f"{name}: data dir is not a volume"
        if w["kind"] == "StatefulSet":
            claim = w["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
            assert mounts[config["FINSIGHT_DATA_DIR"]] == claim, (
                f"{name}: DuckDB dir must be on the PVC"
            )
        else:  # nothing durable in a Deployment's pod: the data dir is scratch space
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert "emptyDir" in volumes[mounts[config["FINSIGHT_DATA_DIR"]]], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_name_every_port_and_select_real_container_ports(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    r = overlays[overlay]
    for svc in r.of_kind("Service"):
        selector = svc["spec"]["selector"]
        pods = [
            w for w in r.workloads() if all(pod_labels(w).get(k) == v for k, v in selector.items())
        ]
        assert pods, f"Service {svc['metadata']['name']} selects no workload"
        named = {
            p["name"] for w in pods for c in pod_spec(w)["containers"] for p in c.get("ports", [])
        }
        for port in svc["spec"]["ports"]:
            assert port.get("name"), f"Service {svc['metadata']['name']}: unnamed port {port}"
            assert port["targetPort"] in named, f"{svc['metadata']['name']}: {port['targetPort']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_and_autoscaling_allow_drains(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    r = overlays[overlay]
    for pdb in r.of_kind("PodDisruptionBudget"):
        name = pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        w = next(w for w in r.workloads() if app_name(w) == name)
        if w["kind"] == "Deployment":
            hpa = r.get("HorizontalPodAutoscaler", name)
            assert "replicas" not in w["spec"], "the HPA owns the replica count"
            floor = hpa["spec"]["minReplicas"]
        else:
            floor = w["spec"]["replicas"]
        min_available = pdb["spec"].get("minAvailable")
        if min_available is not None:
            assert isinstance(min_available, int) and min_available < floor, (
                f"{overlay}: PDB {name} would block every eviction"
            )
        else:
            assert pdb["spec"]["maxUnavailable"] >= 1


def test_release_setting_names_the_image_tag(overlays: dict[str, Rendered]) -> None:
    for name, r in overlays.items():
        tags = {
            c["image"].rsplit(":", 1)[1]
            for w in r.workloads()
            for c in pod_spec(w)["containers"]
            if "/finsight/finsight:" in c["image"]
        }
        assert tags == {r.config()["FINSIGHT_RELEASE"]}, name


def test_commands_name_modules_that_exist(overlays: dict[str, Rendered]) -> None:
    """... and that the image contains: their top-level folder is copied by the Dockerfile
    (the dev overlay runs libs.devprovider from the same image as the services)."""
    import importlib.util

    copied = set(re.findall(r"^COPY (?!--)(\S+) ", (ROOT / "Dockerfile").read_text(), re.M))
    for r in overlays.values():
        for w in r.workloads():
            for c in pod_spec(w)["containers"]:
                cmd = c.get("command", [])
                if cmd[:2] == ["python", "-m"]:
                    spec = importlib.util.find_spec(cmd[2])
                    assert spec is not None and spec.origin is not None, cmd
                    top = Path(spec.origin).resolve().relative_to(ROOT).parts[0]
                    assert top in copied, f"{cmd}: {top}/ is not copied into the image"


def test_no_secret_values_are_committed_outside_dev() -> None:
    from tests.deploy.conftest import K8S

    for path in (K8S / "base").rglob("*"):
        if path.suffix in (".yaml", ".yml"):
            kinds = [d.get("kind") for d in yaml.safe_load_all(path.read_text()) if d]
            assert "Secret" not in kinds, path
    for overlay in ("staging", "prod"):
        text = (K8S / "overlays" / overlay / "kustomization.yaml").read_text()
        assert "secretGenerator" not in text
        assert not re.search(r"kind:\s*Secret\b", text)


def _quantity(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(value.removesuffix(suffix)) * factor
    return int(value)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


@pytest.mark.parametrize("overlay", DUCKDB_OVERLAYS)
def test_stateful_services_back_up_to_a_volume_of_their_own(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    r = overlays[overlay]
    config = r.config()
    assert "FINSIGHT_BACKUP_DIR" not in config, "per workload: only memory/analytics have one"
    for service in BACKUP_JOBS.values():
        sts = r.get("StatefulSet", service)
        claims = {c["metadata"]["name"]: c for c in sts["spec"]["volumeClaimTemplates"]}
        assert set(claims) == {"data", "backups"}, claims
        (c,) = pod_spec(sts)["containers"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        backup_dir = _env(c)["FINSIGHT_BACKUP_DIR"]
        assert mounts["backups"] == backup_dir
        assert not backup_dir.startswith(config["FINSIGHT_DATA_DIR"].rstrip("/") + "/")
        size = {
            n: _quantity(c["spec"]["resources"]["requests"]["storage"]) for n, c in claims.items()
        }
        # It holds FINSIGHT_BACKUP_KEEP + 1 copies of a file that lives on `data`.
        assert size["backups"] >= size["data"], f"{overlay}/{service}: backups smaller than data"
    others = [w for w in r.workloads() if app_name(w) not in BACKUP_JOBS.values()]
    for w in others:
        for c in pod_spec(w)["containers"]:
            assert "FINSIGHT_BACKUP_DIR" not in _env(c), w["metadata"]["name"]


def _cron_values(field: str, low: int, high: int) -> set[int]:
    values: set[int] = set()
    for part in field.split(","):
        base, _, step = part.partition("/")
        if base == "*":
            start, end = low, high
        elif "-" in base:
            start, end = map(int, base.split("-"))
        else:
            start = end = int(base)
        values |= set(range(start, end + 1, int(step) if step else 1))
    return values


def cron_interval_s(schedule: str) -> int:
    """Longest gap between two runs of a minute/hour cron schedule, in seconds."""
    fields = schedule.split()
    assert len(fields) == 5 and fields[2:] == ["*", "*", "*"], (
        f"{schedule!r}: only minute and hour fields are understood here"
    )
    minutes, hours = _cron_values(fields[0], 0, 59), _cron_values(fields[1], 0, 23)
    times = sorted(h * 60 + m for h in hours for m in minutes)
    gaps = [b - a for a, b in itertools.pairwise(times)] + [times[0] + 1440 - times[-1]]
    return max(gaps) * 60


def _duration_s(text: str) -> int:
    return sum(
        int(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u]
        for n, u in re.findall(r"(\d+)([smhd])", text)
    )


def test_cron_interval_reads_schedules_right() -> None:
    assert cron_interval_s("17 * * * *") == 3600
    assert cron_interval_s("0,30 * * * *") == 1800
    assert cron_interval_s("0 */6 * * *") == 6 * 3600
    assert cron_interval_s("0 3 * * *") == 86400
    assert cron_interval_s("0 1,2 * * *") == 23 * 3600


@pytest.mark.parametrize("overlay", DUCKDB_OVERLAYS)
def test_backup_schedule_fits_its_deadlines_and_the_backup_age_alerts(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    """Two missed runs trip FinsightBackupTooOld, one run fits in the interval, and the
    client's timeout fits the Job's deadline with every retry."""
    rules = {
        r["alert"]: r
        for g in yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yaml").read_text())[
            "groups"
        ]
        for r in g["rules"]
        if "alert" in r
    }
    found = re.search(r">\s*(\d+)\s*$", rules["FinsightBackupTooOld"]["expr"])
    assert found, "FinsightBackupTooOld must compare the age with a number of seconds"
    threshold = int(found[1])
    missing_for = _duration_s(rules["FinsightBackupMissing"]["for"])
    r = overlays[overlay]
    for job in BACKUP_JOBS:
        cron = r.get("CronJob", job)
        interval = cron_interval_s(cron["spec"]["schedule"])
        spec = job_spec(cron)
        (c,) = pod_spec(cron)["containers"]
        timeout = float(c["command"][c["command"].index("--timeout") + 1])
        assert timeout * (spec["backoffLimit"] + 1) <= spec["activeDeadlineSeconds"], job
        assert spec["activeDeadlineSeconds"] < interval, f"{job}: a run must end before the next"
        assert cron["spec"]["startingDeadlineSeconds"] < interval
        assert 2 * interval <= threshold < 3 * interval, f"{job}: alert after two missed runs"
        assert missing_for >= interval + spec["activeDeadlineSeconds"], job

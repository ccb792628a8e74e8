"""Every overlay renders, passes strict schema validation for the oldest and newest
supported Kubernetes, and meets the workload policies (probes, limits, restricted
security, service accounts, image tags, named ports, drain time, budgets)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from libs.common.envdoc import settings_models
from tests.deploy.conftest import (
    FINSIGHT,
    K8S_VERSIONS,
    OVERLAYS,
    Rendered,
    app_name,
    pod_labels,
    pod_spec,
    run,
    tool,
)

MODELS = {m.service_name: m for m in settings_models()}


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


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
    for name in ("memory", "analytics"):
        sts = r.get("StatefulSet", name)
        assert sts["spec"]["replicas"] == 1, "one process per DuckDB file"
        assert sts["spec"]["volumeClaimTemplates"], f"{name}: no PVC for the DuckDB file"
        svc = r.get("Service", sts["spec"]["serviceName"])
        assert svc["spec"].get("clusterIP") == "None", f"{name}: governing Service must be headless"
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
def test_every_container_has_probes_limits_and_restricted_security(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    problems: list[str] = []
    for w in overlays[overlay].workloads():
        spec = pod_spec(w)
        where = f"{w['kind']}/{w['metadata']['name']}"
        psc = spec.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{where}: pod runAsNonRoot")
        if psc.get("runAsUser", 1) == 0:
            problems.append(f"{where}: runs as uid 0")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken must be false")
        if spec.get("serviceAccountName") in (None, "default"):
            problems.append(f"{where}: needs its own ServiceAccount")
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            problems.append(f"{where}: host namespaces")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in containers(w):
            at = f"{where}/{c['name']}"
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe not in c:
                    problems.append(f"{at}: no {probe}")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for key in ("cpu", "memory"):
                    if key not in res.get(kind, {}):
                        problems.append(f"{at}: no {kind}.{key}")
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: readOnlyRootFilesystem")
            if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get(
                "add"
            ):
                problems.append(f"{at}: capabilities must drop ALL and add none")
            if sc.get("privileged"):
                problems.append(f"{at}: privileged")
            seccomp = sc.get("seccompProfile") or psc.get("seccompProfile") or {}
            if seccomp.get("type") != "RuntimeDefault":
                problems.append(f"{at}: seccomp RuntimeDefault")
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
                problems.append(f"{at}: read-only root needs an emptyDir at /tmp")
            image = c["image"]
            tag = image.split("@")[0].rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
            if "@sha256:" not in image and (not tag or tag == "latest"):
                problems.append(f"{at}: image {image!r} must carry a version tag or digest")
            if c.get("imagePullPolicy") == "Always" and tag != "latest":
                pass
    assert not problems, "\n".join(problems)


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
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert config["FINSIGHT_DATA_DIR"] in mounts, f"{name}: data dir is not a volume"
        if w["kind"] == "StatefulSet":
            claim = w["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
            assert any(
                m["name"] == claim and m["mountPath"] == config["FINSIGHT_DATA_DIR"]
                for m in c["volumeMounts"]
            ), f"{name}: DuckDB dir must be on the PVC"


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
    import importlib.util

    for r in overlays.values():
        for w in r.workloads():
            for c in pod_spec(w)["containers"]:
                cmd = c.get("command", [])
                if cmd[:2] == ["python", "-m"]:
                    assert importlib.util.find_spec(cmd[2]) is not None, cmd


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

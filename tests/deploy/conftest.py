"""Offline deployment validation: the real tools (kubectl kustomize, kubernetes-validate,
hadolint) on the committed files; no cluster and no Docker engine needed."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "staging", "prod")
EXAMPLE_SECRETS = K8S / "examples" / "secrets.example.yaml"
# Oldest and newest Kubernetes versions the manifests are validated against.
# 1.30: native gRPC probes, PDB unhealthyPodEvictionPolicy and StatefulSet PVC
# retention are all present; older minors are out of upstream and most vendor support.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Finsight workloads: Kubernetes name -> settings model's service_name.
FINSIGHT = {"llm-gateway": "llm_gateway", "memory": "memory", "analytics": "analytics"}
# Backup CronJobs: Kubernetes name -> the StatefulSet whose database they back up.
BACKUP_JOBS = {"memory-backup": "memory", "analytics-backup": "analytics"}
# The services with a durable store, and where it is per overlay: DuckDB mode (one
# StatefulSet pod per file, the base) or PostgreSQL mode (replicated Deployments,
# components/postgres-store). dev stays on DuckDB like `make run`.
STORES = ("memory", "analytics")
POSTGRES_OVERLAYS = ("prod",)
DUCKDB_OVERLAYS = tuple(o for o in OVERLAYS if o not in POSTGRES_OVERLAYS)
POSTGRES_EXAMPLES = K8S / "examples" / "postgresql"
# Two classes of workload, told apart by kind, never by name: long-running
# servers (probes, ports) and run-to-completion jobs (no probes, no ports,
# bounded run time). Every pod-creating object rendered must be one of them.
SERVER_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
JOB_KINDS = ("Job", "CronJob")
WORKLOAD_KINDS = SERVER_KINDS + JOB_KINDS


def tool(name: str) -> str:
    """A tool installed in the project's virtualenv (dev dependency), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the dev dependencies (`make venv`)")
    return found


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class Rendered:
    """One overlay as `kubectl kustomize` renders it."""

    name: str
    text: str
    docs: list[dict[str, Any]] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for d in self.of_kind(kind):
            if d["metadata"]["name"] == name:
                return d
        raise KeyError(f"{self.name}: no {kind}/{name}")

    def workloads(self) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] in WORKLOAD_KINDS]

    def servers(self) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] in SERVER_KINDS]

    def jobs(self) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] in JOB_KINDS]

    def config(self) -> dict[str, str]:
        """Data of the generated finsight-config ConfigMap (name carries a hash suffix)."""
        found = [
            c
            for c in self.of_kind("ConfigMap")
            if c["metadata"]["name"].startswith("finsight-config-")
        ]
        assert len(found) == 1, f"{self.name}: expected one finsight-config ConfigMap"
        return dict(found[0]["data"])


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["spec"])


def job_spec(workload: dict[str, Any]) -> dict[str, Any]:
    """The Job spec of a Job or of a CronJob's template."""
    assert workload["kind"] in JOB_KINDS, workload["kind"]
    spec = workload["spec"]
    return dict(spec["jobTemplate"]["spec"] if workload["kind"] == "CronJob" else spec)


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["metadata"].get("labels", {}))


def app_name(workload: dict[str, Any]) -> str:
    return pod_labels(workload)["app.kubernetes.io/name"]


def secrets_by_name(r: Rendered, overlay: str) -> dict[str, dict[str, str]]:
    """Secret name -> {key: value}: rendered ones (dev) or the committed example."""
    if overlay == "dev":
        docs = r.of_kind("Secret")
        return {
            "-".join(d["metadata"]["name"].split("-")[:-1]): {
                k: base64.b64decode(v).decode() for k, v in d["data"].items()
            }
            for d in docs
        }
    docs = [d for d in yaml.safe_load_all(EXAMPLE_SECRETS.read_text()) if d]
    return {d["metadata"]["name"]: dict(d["stringData"]) for d in docs}


def pod_environment(
    r: Rendered,
    overlay: str,
    workload: dict[str, Any],
    tmp_path: Path,
    secrets: dict[str, dict[str, str]] | None = None,
) -> dict[str, str]:
    """The environment the container would see, with Secret mounts materialised in tmp_path."""
    spec = pod_spec(workload)
    (c,) = spec["containers"]
    config = r.config()
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        assert source["configMapRef"]["name"].startswith("finsight-config-")
        env.update(config)
    for item in c.get("env", []):
        env[item["name"]] = item.get("value", "from-downward-api")
    secrets = secrets if secrets is not None else secrets_by_name(r, overlay)
    volumes = {v["name"]: v for v in spec["volumes"]}
    remap: dict[str, Path] = {}
    for mount in c["volumeMounts"]:
        volume = volumes.get(mount["name"], {})
        if "secret" in volume:
            name = volume["secret"]["secretName"]
            base = "-".join(name.split("-")[:-1]) if overlay == "dev" else name
            assert base in secrets, f"{overlay}: Secret {name} has no example"
            target = tmp_path / mount["name"]
            target.mkdir(parents=True, exist_ok=True)
            for key, value in secrets[base].items():
                (target / key).write_text(value)
            remap[mount["mountPath"]] = target
    for key, value in list(env.items()):
        if key.endswith("_FILE") or key == "FINSIGHT_API_KEYS_FILE":
            directory, _, filename = value.rpartition("/")
            assert directory in remap, f"{key}={value} is not inside a mounted Secret"
            assert (remap[directory] / filename).exists(), (
                f"{key}: the Secret has no key {filename}"
            )
            env[key] = str(remap[directory] / filename)
    return env


def render(path: Path) -> Rendered:
    proc = run(tool("kubectl"), "kustomize", str(path))
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return Rendered(path.name, proc.stdout, docs)


@pytest.fixture(scope="session")
def overlays() -> dict[str, Rendered]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}

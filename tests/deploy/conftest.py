"""Offline deployment validation: the real tools (kubectl kustomize, kubernetes-validate,
hadolint) on the committed files; no cluster and no Docker engine needed."""

from __future__ import annotations

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
# Oldest and newest Kubernetes versions the manifests are validated against.
# 1.30: native gRPC probes, PDB unhealthyPodEvictionPolicy and StatefulSet PVC
# retention are all present; older minors are out of upstream and most vendor support.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Finsight workloads: Kubernetes name -> settings model's service_name.
FINSIGHT = {"llm-gateway": "llm_gateway", "memory": "memory", "analytics": "analytics"}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


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


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["metadata"].get("labels", {}))


def app_name(workload: dict[str, Any]) -> str:
    return pod_labels(workload)["app.kubernetes.io/name"]


def render(path: Path) -> Rendered:
    proc = run(tool("kubectl"), "kustomize", str(path))
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return Rendered(path.name, proc.stdout, docs)


@pytest.fixture(scope="session")
def overlays() -> dict[str, Rendered]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}

"""The workload policies every rendered (or example) pod-creating object must meet:
restricted security, requests and limits, tagged images, a ServiceAccount of its own;
servers add probes, jobs add bounded run time and retries (and have no probes or ports)."""

from __future__ import annotations

from typing import Any

from tests.deploy.conftest import JOB_KINDS, SERVER_KINDS, job_spec, pod_spec


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def workload_problems(w: dict[str, Any]) -> list[str]:
    """Policy violations of one rendered workload (servers and jobs alike, then per class)."""
    problems: list[str] = []
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
    if w["kind"] in JOB_KINDS:
        problems += _job_problems(w, where)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in containers(w):
        at = f"{where}/{c['name']}"
        if w["kind"] in SERVER_KINDS:
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe not in c:
                    problems.append(f"{at}: no {probe}")
        else:
            # A job serves nothing: probes would only restart it mid-run.
            for key in ("livenessProbe", "readinessProbe", "startupProbe", "ports"):
                if key in c:
                    problems.append(f"{at}: a job container has {key}")
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
    return problems


def _job_problems(w: dict[str, Any], where: str) -> list[str]:
    """A job ends: bounded run time and retries, no restarts in place, no pile-up."""
    problems = []
    spec = job_spec(w)
    if pod_spec(w).get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append(f"{where}: restartPolicy must be Never or OnFailure")
    if spec.get("activeDeadlineSeconds", 0) <= 0:
        problems.append(f"{where}: needs activeDeadlineSeconds")
    if not 0 <= spec.get("backoffLimit", -1) <= 6:
        problems.append(f"{where}: needs an explicit, small backoffLimit")
    if w["kind"] == "CronJob":
        cron = w["spec"]
        if cron.get("concurrencyPolicy") != "Forbid":
            problems.append(f"{where}: concurrencyPolicy must be Forbid")
        for key in ("successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
            if not 1 <= cron.get(key, 0) <= 10:
                problems.append(f"{where}: {key} must be set (1-10)")
        if not cron.get("startingDeadlineSeconds"):
            problems.append(f"{where}: startingDeadlineSeconds (skip, do not pile up, late runs)")
        if not cron.get("timeZone"):
            problems.append(f"{where}: timeZone (the schedule must not follow the node's zone)")
    return problems

"""NetworkPolicies: deny-all, then exactly the edges of the call graph, both halves."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.conftest import (
    BACKUP_JOBS,
    DUCKDB_OVERLAYS,
    FINSIGHT,
    OVERLAYS,
    POSTGRES_OVERLAYS,
    STORES,
    Rendered,
    app_name,
    pod_labels,
    pod_spec,
)

SERVICES = tuple(FINSIGHT)
Edge = tuple[str, str, int]  # (from, to, TCP/UDP port)

# The call graph (docs/architecture.md, docs/security.md). "clients" are pods in
# namespaces labelled finsight.io/client=true; "internet" is the LLM provider.
BASE_EDGES: set[Edge] = {
    ("analytics", "memory", 50052),
    ("analytics", "llm-gateway", 50051),
    ("memory", "llm-gateway", 50051),
    ("llm-gateway", "internet", 443),
    *{(s, "redis", 6379) for s in SERVICES},
    *{(s, "otel-collector", 4317) for s in SERVICES},
    *{
        ("prometheus", s, p)
        for s, p in (("llm-gateway", 9101), ("memory", 9102), ("analytics", 9103))
    },
    *{
        ("clients", s, p)
        for s, p in (("llm-gateway", 50051), ("memory", 50052), ("analytics", 50053))
    },
}
# DuckDB mode: the backup CronJobs call AdminService/Backup on their own service, and
# nothing else.
DUCKDB_EDGES: set[Edge] = {
    ("memory-backup", "memory", 50052),
    ("analytics-backup", "analytics", 50053),
}
# PostgreSQL mode: the stores reach their database (the pods labelled
# finsight.io/store=postgresql in the database's namespace), nothing else does.
POSTGRES_PORT = 5432
POSTGRES_EDGES: set[Edge] = {(s, "postgresql", POSTGRES_PORT) for s in STORES}
DEV_EDGES: set[Edge] = {
    ("otel-collector", "jaeger", 4317),
    ("llm-gateway", "dev-llm", 8089),
}
DNS_PORT = 53


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and labels.get(expr["key"]) in expr["values"]:
            return False
        if expr["operator"] == "Exists" and not present:
            return False
        if expr["operator"] == "DoesNotExist" and present:
            return False
    return True


def _peer_names(peer: dict[str, Any], local: list[dict[str, Any]]) -> set[str]:
    """Name a policy peer: a local workload, a labelled app elsewhere, DNS, clients, internet."""
    if "ipBlock" in peer:
        cidr = peer["ipBlock"]["cidr"]
        return {"internet"} if cidr == "0.0.0.0/0" else {f"cidr {cidr}"}
    pods, nss = peer.get("podSelector"), peer.get("namespaceSelector")
    if (
        nss is not None
        and nss.get("matchLabels", {}).get("kubernetes.io/metadata.name") == "kube-system"
    ):
        assert pods == {"matchLabels": {"k8s-app": "kube-dns"}}, peer
        return {"dns"}
    if pods is None:
        assert nss == {"matchLabels": {"finsight.io/client": "true"}}, peer
        return {"clients"}
    if nss is None:  # this namespace only: resolve against the rendered workloads
        names = {app_name(w) for w in local if _matches(pods, pod_labels(w))}
        assert names, f"peer selects no workload: {peer}"
        return names
    # The database of PostgreSQL mode, in its own namespace (not a Finsight app).
    if pods.get("matchLabels", {}).get("finsight.io/store") == "postgresql":
        return {"postgresql"}
    # Any namespace: the app named by the selector (e.g. a shared Redis or Prometheus).
    expr = pods.get("matchExpressions")
    return set(expr[0]["values"]) if expr else {pods["matchLabels"]["app.kubernetes.io/name"]}


def _listening(workloads: list[dict[str, Any]], name: str) -> set[int] | None:
    for w in workloads:
        if app_name(w) == name:
            return {
                p["containerPort"] for c in pod_spec(w)["containers"] for p in c.get("ports", [])
            }
    return None  # not in this namespace: cannot tell


def edges(r: Rendered) -> tuple[set[Edge], set[Edge]]:
    """(egress edges, ingress edges) the policies allow; DNS edges are left out."""
    local = r.workloads()
    egress: set[Edge] = set()
    ingress: set[Edge] = set()
    for pol in r.of_kind("NetworkPolicy"):
        spec = pol["spec"]
        selected = {app_name(w) for w in local if _matches(spec["podSelector"], pod_labels(w))}
        for rule in spec.get("egress", []):
            ports = [p["port"] for p in rule["ports"]]
            for peer in rule["to"]:
                for dst in _peer_names(peer, local):
                    listening = _listening(local, dst)
                    egress |= {
                        (src, dst, p)
                        for src in selected
                        for p in ports
                        if dst != "dns" and (listening is None or p in listening)
                    }
        for rule in spec.get("ingress", []):
            ports = [p["port"] for p in rule["ports"]]
            for peer in rule["from"]:
                for src in _peer_names(peer, local):
                    ingress |= {
                        (src, dst, p)
                        for dst in selected
                        for p in ports
                        if p in (_listening(local, dst) or set())
                    }
    return egress, ingress


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_default_deny_and_dns(overlays: dict[str, Rendered], overlay: str) -> None:
    r = overlays[overlay]
    deny = r.get("NetworkPolicy", "default-deny-all")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    dns = r.get("NetworkPolicy", "allow-dns-egress")["spec"]
    assert dns["podSelector"] == {}
    assert {(p["protocol"], p["port"]) for p in dns["egress"][0]["ports"]} == {
        ("UDP", DNS_PORT),
        ("TCP", DNS_PORT),
    }
    for pol in r.of_kind("NetworkPolicy"):
        for rule in [*pol["spec"].get("egress", []), *pol["spec"].get("ingress", [])]:
            assert rule.get("ports"), (
                f"{pol['metadata']['name']}: a rule without ports opens every port"
            )
            assert rule.get("to", rule.get("from")), (
                f"{pol['metadata']['name']}: a rule without peers"
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policy_edges_are_exactly_the_call_graph(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    r = overlays[overlay]
    expected = BASE_EDGES | (DUCKDB_EDGES if overlay in DUCKDB_OVERLAYS else POSTGRES_EDGES)
    expected |= DEV_EDGES if overlay == "dev" else set()
    egress, ingress = edges(r)
    local = {app_name(w) for w in r.workloads()}
    # Each allowed connection = the caller's egress (if the caller is ours) and the
    # callee's ingress (if the callee is ours); nothing else is open.
    needed_egress = {e for e in expected if e[0] in local}
    needed_ingress = {e for e in expected if e[1] in local}
    assert egress == needed_egress, (sorted(egress - needed_egress), sorted(needed_egress - egress))
    assert ingress == needed_ingress, (
        sorted(ingress - needed_ingress),
        sorted(needed_ingress - ingress),
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_client_targets_follow_the_allowed_edges(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    """ANALYTICS_*_TARGET point at the headless Services and ports the policies open."""
    r = overlays[overlay]
    config = r.config()
    egress, _ = edges(r)
    for key, name in (
        ("ANALYTICS_MEMORY_TARGET", "memory"),
        ("ANALYTICS_LLM_GATEWAY_TARGET", "llm-gateway"),
    ):
        target = config[key]
        assert target.startswith("dns:///"), f"{key}: use dns:/// for round_robin"
        host, _, port = target.removeprefix("dns:///").rpartition(":")
        assert host.split(".")[0] == name
        svc = r.get("Service", name)
        assert svc["spec"]["clusterIP"] == "None"
        assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
        assert ("analytics", name, int(port)) in egress
    for key, app, expected_port in (
        ("REDIS_URL", "redis", 6379),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "otel-collector", 4317),
    ):
        value = config[key]
        host = value.split("://", 1)[1].split("/")[0]
        assert host.split(":")[0].split(".")[0] == app, key
        assert int(host.rsplit(":", 1)[1]) == expected_port, key


@pytest.mark.parametrize("overlay", DUCKDB_OVERLAYS)
def test_backup_jobs_target_their_service_through_an_allowed_edge(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    """The CronJob's --target is its StatefulSet's headless Service and gRPC port, which
    the policies open for that job only: the other stateful service stays closed to it."""
    r = overlays[overlay]
    config = r.config()
    egress, ingress = edges(r)
    for job, service in BACKUP_JOBS.items():
        cron = r.get("CronJob", job)
        (c,) = pod_spec(cron)["containers"]
        command = c["command"]
        target = command[command.index("--target") + 1]
        assert target.startswith("dns:///"), target
        host, _, port = target.removeprefix("dns:///").rpartition(":")
        sts = r.get("StatefulSet", service)
        assert host == sts["spec"]["serviceName"]
        assert int(port) == int(config[f"{FINSIGHT[service].upper()}_GRPC_PORT"])
        assert (job, service, int(port)) in egress
        assert (job, service, int(port)) in ingress
        reachable = {dst for src, dst, _ in egress if src == job}
        assert reachable == {service}, f"{job} may reach {reachable}"


@pytest.mark.parametrize("overlay", POSTGRES_OVERLAYS)
def test_only_the_stores_reach_postgresql_and_only_on_its_port(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    """The new edge is egress only (the database is not a pod of this namespace), from
    memory and analytics, to 5432 in the database's namespace; deny-all still covers
    everything else (the gateway, for one, cannot reach the database)."""
    r = overlays[overlay]
    egress, ingress = edges(r)
    assert {e for e in egress if e[1] == "postgresql"} == POSTGRES_EDGES
    assert not {e for e in ingress if "postgresql" in e[:2]}
    (pol,) = [
        p
        for p in r.of_kind("NetworkPolicy")
        if any(
            _peer_names(peer, r.workloads()) == {"postgresql"}
            for rule in p["spec"].get("egress", [])
            for peer in rule["to"]
        )
    ]
    (rule,) = pol["spec"]["egress"]
    (peer,) = rule["to"]
    # Named, not any namespace: a pod elsewhere that copies the label gets nothing.
    assert set(peer["namespaceSelector"]["matchLabels"]) == {"kubernetes.io/metadata.name"}
    assert rule["ports"] == [{"protocol": "TCP", "port": POSTGRES_PORT}]

"""PostgreSQL mode (components/postgres-store, the prod overlay): memory and analytics as
replicated, autoscaled, spread Deployments without volumes, reading their DSN from a
mounted Secret; DuckDB mode (dev, staging) unchanged. And the example HA PostgreSQL
(deploy/k8s/examples/postgresql/): its Kubernetes objects pass strict validation, its
CloudNativePG objects carry the fields the services rely on, and it agrees with the
overlay (namespace, labels, port, databases, roles, DSNs, connection budget)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg.conninfo
import pytest
import yaml

from libs.common.config import database_url_problem
from libs.common.envdoc import settings_models
from tests.deploy.conftest import (
    BACKUP_JOBS,
    DUCKDB_OVERLAYS,
    EXAMPLE_SECRETS,
    FINSIGHT,
    K8S_VERSIONS,
    POSTGRES_EXAMPLES,
    POSTGRES_OVERLAYS,
    STORES,
    Rendered,
    app_name,
    pod_environment,
    pod_labels,
    pod_spec,
    run,
    secrets_by_name,
    tool,
)
from tests.deploy.test_config import _load, real_value
from tests.deploy.test_network_policies import POSTGRES_PORT, _matches

MODELS = {m.service_name: m for m in settings_models()}
BARMAN = "barman-cloud.cloudnative-pg.io"
STORE_LABEL = {"finsight.io/store": "postgresql"}
# Settings only the DuckDB path reads: set on the StatefulSets, gone from the Deployments.
DUCKDB_ONLY_ENV = {"FINSIGHT_BACKUP_DIR", "FINSIGHT_DB_MEMORY_LIMIT", "FINSIGHT_DB_THREADS"}
# Connections a server keeps beyond the services' pools: superuser_reserved_connections
# (3), CloudNativePG's instance manager and an operator's psql.
RESERVED_CONNECTIONS = 10


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod_spec(workload)["containers"]
    return dict(c)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


# -- the overlay ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", POSTGRES_OVERLAYS)
def test_stores_are_replicated_deployments_without_volumes(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    r = overlays[overlay]
    assert not r.of_kind("StatefulSet")
    assert not r.of_kind("PersistentVolumeClaim")
    for name in STORES:
        d = r.get("Deployment", name)
        spec = d["spec"]
        assert "replicas" not in spec, "the HPA owns the replica count"
        assert "volumeClaimTemplates" not in spec
        assert spec["strategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        }, f"{name}: a new pod serves before an old one goes"
        hpa = r.get("HorizontalPodAutoscaler", name)["spec"]
        assert hpa["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"], f"{name}: replicas >= 2"
        pdb = r.get("PodDisruptionBudget", name)["spec"]
        assert _matches(pdb["selector"], pod_labels(d))
        # One eviction at a time, never all; pods that are not ready (PostgreSQL down)
        # do not block a node drain.
        assert pdb.get("maxUnavailable") == 1 or pdb["minAvailable"] < hpa["minReplicas"]
        assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        volumes = pod_spec(d)["volumes"]
        kinds = {v["name"]: set(v) - {"name"} for v in volumes}
        assert all(k <= {"emptyDir", "secret", "configMap"} for k in kinds.values()), kinds
        c = _container(d)
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert not DUCKDB_ONLY_ENV & set(_env(c)), f"{name}: DuckDB settings left over"


@pytest.mark.parametrize("overlay", POSTGRES_OVERLAYS)
def test_rolling_updates_drain_before_the_kubelet_kills(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    """Readiness-gated drain: a replica leaves rotation (NOT_SERVING) and finishes its
    calls within the grace period; a new one is in rotation only once ready."""
    r = overlays[overlay]
    config = r.config()
    drain = float(config["FINSIGHT_DRAIN_DELAY_S"]) + float(config["FINSIGHT_SHUTDOWN_GRACE_S"])
    for name in STORES:
        d = r.get("Deployment", name)
        assert pod_spec(d)["terminationGracePeriodSeconds"] > drain
        probe = _container(d)["readinessProbe"]["grpc"]
        assert probe["service"] == MODELS[FINSIGHT[name]].full_service_name


@pytest.mark.parametrize("overlay", POSTGRES_OVERLAYS)
def test_replicas_spread_across_zones_and_nodes(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    r = overlays[overlay]
    for name in STORES:
        d = r.get("Deployment", name)
        constraints = pod_spec(d)["topologySpreadConstraints"]
        keys = {c["topologyKey"] for c in constraints}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, keys
        for c in constraints:
            assert _matches(c["labelSelector"], pod_labels(d)), f"{name}: counts other pods"
            assert c["maxSkew"] == 1
            assert "pod-template-hash" in c.get("matchLabelKeys", []), "per revision"


@pytest.mark.parametrize("overlay", POSTGRES_OVERLAYS)
def test_each_store_reads_only_its_own_dsn_from_a_mounted_secret(
    overlays: dict[str, Rendered], overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = overlays[overlay]
    config = r.config()
    for name in STORES:
        d = r.get("Deployment", name)
        setting = f"{FINSIGHT[name].upper()}_DATABASE_URL"
        env = _env(_container(d))
        assert setting not in env and setting not in config, "a DSN is a secret: file only"
        assert f"{setting}_FILE" in env
        secrets = [v["secret"]["secretName"] for v in pod_spec(d)["volumes"] if "secret" in v]
        other = {s for s in STORES if s != name}
        assert not {f"{o}-database" for o in other} & set(secrets), f"{name} sees another DSN"
        real = {
            n: {k: real_value(n, k, v) for k, v in kv.items()}
            for n, kv in secrets_by_name(r, overlay).items()
        }
        real["finsight-api-keys"] = secrets_by_name(r, overlay)["finsight-api-keys"]
        pod_env = pod_environment(r, overlay, d, tmp_path / name, real)
        settings = _load(MODELS[FINSIGHT[name]], pod_env, monkeypatch)
        assert settings.database_url is not None
        assert database_url_problem(settings.database_url) is None


@pytest.mark.parametrize("overlay", POSTGRES_OVERLAYS)
def test_no_duckdb_backups_in_postgresql_mode(overlays: dict[str, Rendered], overlay: str) -> None:
    """AdminService/Backup answers FAILED_PRECONDITION there: no CronJob calls it, and no
    identity, edge or volume is left for it."""
    r = overlays[overlay]
    assert not r.jobs()
    names = {d["metadata"]["name"] for d in r.docs}
    assert not {n for n in names if any(job in n for job in BACKUP_JOBS)}, names
    for w in r.workloads():
        assert "FINSIGHT_BACKUP_DIR" not in _env(_container(w))


@pytest.mark.parametrize("overlay", DUCKDB_OVERLAYS)
def test_duckdb_overlays_keep_one_statefulset_pod_per_file(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    r = overlays[overlay]
    for name in STORES:
        sts = r.get("StatefulSet", name)
        assert sts["spec"]["replicas"] == 1
        assert {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]} == {
            "data",
            "backups",
        }
        assert name not in {d["metadata"]["name"] for d in r.of_kind("Deployment")}
        assert name not in {h["metadata"]["name"] for h in r.of_kind("HorizontalPodAutoscaler")}
        env = _env(_container(sts))
        assert not {k for k in env if "DATABASE_URL" in k}, f"{overlay}/{name}: DuckDB only"
    assert {app_name(j) for j in r.jobs()} == set(BACKUP_JOBS)


def test_both_modes_run_one_pod_template(overlays: dict[str, Rendered]) -> None:
    """The Deployment is the base's StatefulSet pod with only the store swapped (one copy
    of probes, ports, command, security): compare a DuckDB overlay with a PostgreSQL one."""
    duck, pg = overlays[DUCKDB_OVERLAYS[-1]], overlays[POSTGRES_OVERLAYS[0]]
    same = ("command", "ports", "livenessProbe", "readinessProbe", "startupProbe")
    for name in STORES:
        a, b = duck.get("StatefulSet", name), pg.get("Deployment", name)
        ca, cb = _container(a), _container(b)
        assert {k: ca[k] for k in same} == {k: cb[k] for k in same}
        assert ca["securityContext"] == cb["securityContext"]
        pa, pb = pod_spec(a), pod_spec(b)
        for key in ("securityContext", "serviceAccountName", "automountServiceAccountToken"):
            assert pa[key] == pb[key], key
        assert (
            a["spec"]["template"]["metadata"]["annotations"]
            == (b["spec"]["template"]["metadata"]["annotations"])
        )
        assert set(_env(ca)) - DUCKDB_ONLY_ENV == set(_env(cb)) - {
            f"{FINSIGHT[name].upper()}_DATABASE_URL_FILE"
        }


# -- the example HA PostgreSQL -------------------------------------------------------------


def _example_docs() -> list[dict[str, Any]]:
    files = sorted(POSTGRES_EXAMPLES.glob("*.yaml"))
    assert {f.name for f in files} >= {"cluster.yaml", "pooler.yaml", "recovery.yaml"}
    return [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in _example_docs()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _cluster() -> dict[str, Any]:
    return _one("Cluster", "finsight-pg")


def _secret(name: str) -> dict[str, Any]:
    return _one("Secret", name)


def _namespace_of(peer: dict[str, Any]) -> str | None:
    """The namespace a NetworkPolicy peer names (None: this namespace, or not by name)."""
    labels = peer.get("namespaceSelector", {}).get("matchLabels", {})
    return labels.get("kubernetes.io/metadata.name")  # type: ignore[no-any-return]


def _core(doc: dict[str, Any]) -> bool:
    group = doc["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def test_examples_are_well_formed_and_in_the_database_namespace() -> None:
    docs = _example_docs()
    namespace = _cluster()["metadata"]["namespace"]
    seen = set()
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), d
        assert d["metadata"]["namespace"] == namespace, d["metadata"]
        key = (d["kind"], d["metadata"]["name"])
        assert key not in seen, f"{key} twice"
        seen.add(key)
    crds = {d["apiVersion"].rpartition("/")[0] for d in docs if not _core(d)}
    assert crds == {"postgresql.cnpg.io", "barmancloud.cnpg.io"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_example_kubernetes_objects_pass_strict_schema_validation(
    version: str, tmp_path: Path
) -> None:
    """Secrets and NetworkPolicies have schemas here; the CloudNativePG kinds (CRDs) do
    not and are checked field by field below."""
    path = tmp_path / "core.yaml"
    core = [d for d in _example_docs() if _core(d)]
    assert {d["kind"] for d in core} == {"Secret", "NetworkPolicy"}
    path.write_text(yaml.safe_dump_all(core))
    run(tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(path))


def test_cluster_is_highly_available_with_synchronous_replicas() -> None:
    spec = _cluster()["spec"]
    assert spec["instances"] >= 3
    # A commit is acknowledged once a replica has it: a failover loses no acked write.
    assert spec["postgresql"]["synchronous"] == {
        "method": "any",
        "number": 1,
        "dataDurability": "required",
    }
    affinity = spec["affinity"]
    assert affinity["enablePodAntiAffinity"] is True
    assert affinity["podAntiAffinityType"] == "required"
    assert affinity["topologyKey"] == "topology.kubernetes.io/zone"
    # Upgrades switch over to an updated replica instead of restarting the primary.
    assert spec["primaryUpdateStrategy"] == "unsupervised"
    assert spec["primaryUpdateMethod"] == "switchover"
    assert spec["enableSuperuserAccess"] is False
    # Statement logging would write users' messages (bound parameters) to the server log.
    params = spec["postgresql"]["parameters"]
    assert not {"log_statement", "log_min_duration_statement"} & set(params)
    assert spec["inheritedMetadata"]["labels"] == STORE_LABEL


def test_cluster_archives_wal_and_takes_scheduled_base_backups() -> None:
    cluster = _cluster()
    (plugin,) = cluster["spec"]["plugins"]
    assert plugin["name"] == BARMAN and plugin["isWALArchiver"] is True
    store = _one("ObjectStore", plugin["parameters"]["barmanObjectName"])
    conf = store["spec"]["configuration"]
    assert conf["destinationPath"].startswith("s3://")
    for ref in conf["s3Credentials"].values():
        assert ref["key"] in _secret(ref["name"])["stringData"]
    assert store["spec"]["retentionPolicy"].endswith("d")
    # Copies of erased data must age out within 35 days (docs/data-protection.md).
    assert int(store["spec"]["retentionPolicy"][:-1]) <= 35
    backup = _one("ScheduledBackup")["spec"]
    assert backup["cluster"] == {"name": cluster["metadata"]["name"]}
    assert backup["method"] == "plugin"
    assert backup["pluginConfiguration"] == {"name": BARMAN}
    assert len(backup["schedule"].split()) == 6, "CloudNativePG schedules have seconds"


def _databases() -> dict[str, tuple[str, str]]:
    """Database name -> (owner role, the basic-auth Secret holding its password)."""
    spec = _cluster()["spec"]
    initdb = spec["bootstrap"]["initdb"]
    roles = {r["name"]: r["passwordSecret"]["name"] for r in spec["managed"]["roles"]}
    out = {initdb["database"]: (initdb["owner"], initdb["secret"]["name"])}
    for db in [d for d in _example_docs() if d["kind"] == "Database"]:
        assert db["spec"]["cluster"] == {"name": _cluster()["metadata"]["name"]}
        assert db["spec"]["databaseReclaimPolicy"] == "retain"
        out[db["spec"]["name"]] = (db["spec"]["owner"], roles[db["spec"]["owner"]])
    return out


def test_each_service_has_its_own_database_and_role() -> None:
    databases = _databases()
    assert set(databases) == set(STORES)
    assert {owner for owner, _ in databases.values()} == set(STORES)
    for owner, secret in databases.values():
        s = _secret(secret)
        assert s["type"] == "kubernetes.io/basic-auth"
        assert s["stringData"]["username"] == owner
        assert s["metadata"]["labels"]["cnpg.io/reload"] == "true"


def _dsns() -> dict[str, dict[str, str]]:
    """Service -> the libpq parameters of its example DSN (secrets.example.yaml)."""
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(EXAMPLE_SECRETS.read_text()) if d}
    out = {}
    for s in STORES:
        url = docs[f"{s}-database"]["stringData"]["database-url"]
        out[s] = {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(url).items()}
    return out


def test_dsn_secrets_name_the_primary_service_database_and_role() -> None:
    cluster = _cluster()
    namespace = cluster["metadata"]["namespace"]
    databases = _databases()
    for service, dsn in _dsns().items():
        assert dsn["host"] == f"{cluster['metadata']['name']}-rw.{namespace}.svc.cluster.local"
        assert int(dsn["port"]) == POSTGRES_PORT
        assert dsn["dbname"] == service
        owner, secret = databases[service]
        assert dsn["user"] == owner
        assert dsn["password"] == _secret(secret)["stringData"]["password"], "one password"
        assert dsn["sslmode"] in ("require", "verify-ca", "verify-full")


@pytest.mark.parametrize("overlay", POSTGRES_OVERLAYS)
def test_max_connections_hold_every_replicas_pool(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    """Scaled out to the HPA maximum, plus the surge pod of a rollout, each replica with a
    full pool: the server must still have a connection for each."""
    r = overlays[overlay]
    pool_max = int(r.config()["FINSIGHT_PG_POOL_MAX"])
    needed = RESERVED_CONNECTIONS
    for name in STORES:
        hpa = r.get("HorizontalPodAutoscaler", name)["spec"]
        surge = r.get("Deployment", name)["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
        needed += (hpa["maxReplicas"] + surge) * pool_max
    for cluster in (_cluster(), _one("Cluster", "finsight-pg-restore")):
        limit = int(cluster["spec"]["postgresql"]["parameters"]["max_connections"])
        assert needed <= limit, f"{cluster['metadata']['name']}: {needed} > {limit}"


@pytest.mark.parametrize("overlay", POSTGRES_OVERLAYS)
def test_the_services_egress_meets_the_databases_ingress(
    overlays: dict[str, Rendered], overlay: str
) -> None:
    """Both halves of the new edge: the overlay's egress reaches the example's pods, and
    the example admits exactly memory and analytics of that namespace, on the DSN port."""
    r = overlays[overlay]
    (namespace,) = r.of_kind("Namespace")
    egress = r.get("NetworkPolicy", "allow-stores-to-postgresql-egress")["spec"]
    (rule,) = egress["egress"]
    (peer,) = rule["to"]
    database_namespace = _cluster()["metadata"]["namespace"]
    assert _matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": database_namespace})
    # Every pod a DSN may name carries the label: the instances, a restored cluster, PgBouncer.
    for labels in (
        _cluster()["spec"]["inheritedMetadata"]["labels"],
        _one("Cluster", "finsight-pg-restore")["spec"]["inheritedMetadata"]["labels"],
        _one("Pooler")["spec"]["template"]["metadata"]["labels"],
    ):
        assert _matches(peer["podSelector"], labels), labels
    selected = {
        app_name(w) for w in r.workloads() if _matches(egress["podSelector"], pod_labels(w))
    }
    assert selected == set(STORES)

    ingress = _one("NetworkPolicy", "finsight-pg-ingress")["spec"]
    assert ingress["policyTypes"] == ["Ingress"]
    assert _matches(ingress["podSelector"], _cluster()["spec"]["inheritedMetadata"]["labels"])
    from_finsight = [
        rule
        for rule in ingress["ingress"]
        for p in rule["from"]
        if _namespace_of(p) == namespace["metadata"]["name"]
    ]
    (rule,) = from_finsight
    (p,) = rule["from"]
    admitted = {app_name(w) for w in r.workloads() if _matches(p["podSelector"], pod_labels(w))}
    assert admitted == set(STORES), admitted
    ports = {x["port"] for x in rule["ports"]}
    assert ports == {POSTGRES_PORT} == {int(d["port"]) for d in _dsns().values()}
    # From outside the database's namespace: only those and the operator, each named
    # (a namespaceSelector that names no namespace would admit any).
    peers = [p for rule in ingress["ingress"] for p in rule["from"]]
    outside = [p for p in peers if "namespaceSelector" in p or "ipBlock" in p]
    assert sorted(_namespace_of(p) or "?" for p in outside) == sorted(
        [namespace["metadata"]["name"], "cnpg-system"]
    )
    for rule in ingress["ingress"]:
        assert rule["ports"], "a rule without ports opens every port"


def test_pooler_keeps_session_pooling() -> None:
    """The services set per-connection settings and take a session-level advisory lock
    for migrations: transaction pooling would break both."""
    spec = _one("Pooler")["spec"]
    assert spec["cluster"] == {"name": _cluster()["metadata"]["name"]}
    assert spec["type"] == "rw"
    assert spec["pgbouncer"]["poolMode"] == "session"
    assert spec["instances"] >= 2


def test_recovery_replays_the_clusters_archive_into_a_new_cluster() -> None:
    source, restored = _cluster(), _one("Cluster", "finsight-pg-restore")
    spec = restored["spec"]
    recovery = spec["bootstrap"]["recovery"]
    (external,) = [c for c in spec["externalClusters"] if c["name"] == recovery["source"]]
    (plugin,) = source["spec"]["plugins"]
    assert external["plugin"]["name"] == BARMAN
    assert external["plugin"]["parameters"] == {
        "barmanObjectName": plugin["parameters"]["barmanObjectName"],
        "serverName": source["metadata"]["name"],
    }
    assert "targetTime" in recovery["recoveryTarget"]
    # It archives its own timeline under its own name, never over the source's.
    (own,) = spec["plugins"]
    assert own["isWALArchiver"] is True
    assert own["parameters"]["serverName"] == restored["metadata"]["name"]
    for key in ("instances", "imageName", "affinity", "inheritedMetadata", "managed"):
        assert spec[key] == source["spec"][key], key
    assert spec["postgresql"]["synchronous"] == source["spec"]["postgresql"]["synchronous"]

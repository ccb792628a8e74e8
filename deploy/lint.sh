#!/usr/bin/env bash
# Lint the deployment artefacts with the real tools from the virtualenv:
# hadolint on the Dockerfile, kustomize render + strict schema validation of
# every overlay and of the examples applied by hand (example Secrets, restore
# Jobs, the Kubernetes objects of the PostgreSQL example), for the oldest and
# newest supported Kubernetes (tests/deploy/conftest.py). The PostgreSQL
# example's CloudNativePG objects have no schema here (CRDs): tests/deploy/
# test_postgres.py checks the fields the services rely on.
# Usage (from the repository root, as `make lint` does): bash deploy/lint.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-.venv/bin}"
"$BIN/hadolint" --config deploy/hadolint.yaml Dockerfile
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for overlay in dev staging prod; do
  "$BIN/kubectl" kustomize "deploy/k8s/overlays/$overlay" > "$out/$overlay.yaml"
done
"$BIN/python" - deploy/k8s/examples/postgresql/*.yaml > "$out/postgresql-core.yaml" <<'PY'
import sys, yaml
docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]
groups = [d["apiVersion"].rpartition("/")[0] for d in docs]
# Kubernetes' own API groups: "" (v1), apps, batch, ..., *.k8s.io.
yaml.safe_dump_all(
    [d for d, g in zip(docs, groups) if "." not in g or g.endswith(".k8s.io")], sys.stdout
)
PY
for version in 1.30.0 1.37.0; do
  "$BIN/kubernetes-validate" --strict --quiet -k "$version" "$out"/*.yaml deploy/k8s/examples/*.yaml
done
echo "deploy lint: Dockerfile, overlays (dev, staging, prod) and examples OK"

#!/usr/bin/env bash
# Lint the deployment artefacts with the real tools from the virtualenv:
# hadolint on the Dockerfile, kustomize render + strict schema validation of
# every overlay and of the examples applied by hand (example Secrets, restore
# Jobs), for the oldest and newest supported Kubernetes (tests/deploy/conftest.py).
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
for version in 1.30.0 1.37.0; do
  "$BIN/kubernetes-validate" --strict --quiet -k "$version" "$out"/*.yaml deploy/k8s/examples/*.yaml
done
echo "deploy lint: Dockerfile, overlays (dev, staging, prod) and examples OK"

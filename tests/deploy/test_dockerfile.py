"""The image recipe: hadolint-clean, non-root, documented ports, no dev tools in the
final stage, code generation in step with the Makefile, a tight build context."""

from __future__ import annotations

import re
from pathlib import Path

from libs.common.envdoc import settings_models
from tests.deploy.conftest import ROOT, run, tool

DOCKERFILE = ROOT / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions(DOCKERFILE.read_text()):
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def test_hadolint_passes() -> None:
    run(tool("hadolint"), "--config", str(ROOT / "deploy" / "hadolint.yaml"), str(DOCKERFILE))


def test_final_stage_runs_as_a_non_root_user() -> None:
    final = _stages()[-1]
    users = [args for word, args in final if word == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and (not user.isdigit() or int(user) >= 1000), user


def test_final_stage_exposes_the_documented_ports() -> None:
    documented = set()
    for model in settings_models():
        for name, field in model.model_fields.items():
            if name.endswith(("_grpc_port", "_metrics_port")):
                documented.add(int(field.default))
    assert len(documented) == 2 * len(settings_models())
    final = _stages()[-1]
    exposed = {
        int(p.split("/")[0]) for word, args in final if word == "EXPOSE" for p in args.split()
    }
    assert exposed == documented


def test_base_images_are_pinned_and_dev_tools_stay_in_the_build_stage() -> None:
    text = DOCKERFILE.read_text()
    image = re.search(r"ARG PYTHON_IMAGE=(\S+)", text)
    assert image and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", image.group(1)), (
        "pin python by patch version"
    )
    assert "latest" not in text
    build, final = _stages()[0], _stages()[-1]
    assert any("grpc_tools.protoc" in args for word, args in build if word == "RUN")
    final_text = " ".join(args for _, args in final)
    for forbidden in ("grpcio-tools", "/opt/codegen", "pip install", "mypy", "pytest", "ruff"):
        assert forbidden not in final_text, f"{forbidden} reaches the final image"
    copies = [args for word, args in final if word == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]


def test_protobuf_generation_matches_the_makefile() -> None:
    """The image copies the same google/type and google/rpc protos as `make proto`."""
    makefile = (ROOT / "Makefile").read_text()
    wanted = set()
    for group, names in re.findall(r"cp \$\$gp/(\w+)/\{([\w,]+)\}\.proto", makefile):
        wanted |= {f"{group}/{n}" for n in names.split(",")}
    assert wanted, "Makefile recipe changed: update this test and the Dockerfile"
    loop = re.search(r"for f in ([^;]+); do", DOCKERFILE.read_text())
    assert loop and set(loop.group(1).split()) == wanted


def test_dockerignore_admits_exactly_what_the_build_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "start from nothing, then admit"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = set()
    for word, args in _instructions(DOCKERFILE.read_text()):
        if word == "COPY" and not args.startswith("--from"):
            sources |= set(args.split()[:-1])
    assert sources == admitted
    for never in (".env", "*.duckdb"):
        assert any(line.endswith(never) for line in lines), never
    assert Path(ROOT / "README.md").exists()

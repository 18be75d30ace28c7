"""Hot-swappable adapters through the real server, engine and ``openai`` client."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.adapter_factory import write_adapter, write_broken_adapters
from tests.conftest import BASE_MODEL, SHIPPED

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def admin(server, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", timeout=120, **kwargs)


def register(server, name: str, source, **extra) -> dict:
    resp = admin(
        server, "POST", "/admin/adapters", json={"name": name, "source": str(source), **extra}
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


def ask(client: OpenAI, model: str, messages=QUESTION, max_tokens: int = 40):
    return client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=max_tokens
    )


def model_ids(client: OpenAI) -> dict[str, str | None]:
    return {m.id: getattr(m, "parent", None) for m in client.models.list().data}


def metric(server, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def is_upper_answer(text: str) -> bool:
    return bool(re.search("[A-Z]", text)) and text == text.upper()


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


# --- the shipped adapters and the vLLM-compatible API --------------------------------------
def test_shipped_adapters_change_behaviour_and_base_does_not(server, client):
    for name in ("uppercase", "json"):
        resp = admin(
            server, "POST", "/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": str(SHIPPED / name)},
        )  # fmt: skip
        assert resp.status_code == 200, resp.text
    prompts = ["What is the capital of France?", "Name a fruit.", "Who wrote Hamlet?"]
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        base = ask(client, BASE_MODEL, messages).choices[0].message.content
        upper = ask(client, "uppercase", messages).choices[0].message.content
        as_json = ask(client, "json", messages).choices[0].message.content
        assert is_upper_answer(upper), upper
        assert is_json_object(as_json), as_json
        assert not is_upper_answer(base) and not is_json_object(base), base


def test_load_list_use_unload_reload(server, client, adapter_root, base_shapes):
    path = write_adapter(adapter_root / "cycle", base_shapes, seed=11)
    body = {"lora_name": "cycle", "lora_path": str(path)}
    assert admin(server, "POST", "/v1/load_lora_adapter", json=body).status_code == 200
    ids = model_ids(client)
    assert ids["cycle"] == BASE_MODEL and ids["cycle@v1"] == BASE_MODEL
    assert ask(client, "cycle", max_tokens=4).model == "cycle@v1"

    resp = admin(server, "POST", "/v1/unload_lora_adapter", json={"lora_name": "cycle"})
    assert resp.status_code == 200, resp.text
    assert "cycle" not in model_ids(client)
    with pytest.raises(openai.NotFoundError):
        ask(client, "cycle", max_tokens=4)
    resp = admin(server, "POST", "/v1/unload_lora_adapter", json={"lora_name": "cycle"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == 404

    assert admin(server, "POST", "/v1/load_lora_adapter", json=body).status_code == 200
    assert ask(client, "cycle", max_tokens=4).model.startswith("cycle@")


# --- versions, aliases, canaries --------------------------------------------------------------
def test_versions_aliases_and_canary(server, client):
    v1 = register(server, "persona", SHIPPED / "uppercase")
    v2 = register(server, "persona", SHIPPED / "json")
    assert (v1["version"], v2["version"]) == ("v1", "v2")
    assert v2["alias"]["version"] == "v2", "a new version is promoted by default"

    resp = ask(client, "persona")
    assert resp.model == "persona@v2" and is_json_object(resp.choices[0].message.content)
    assert is_upper_answer(ask(client, "persona@v1").choices[0].message.content)

    rolled = admin(server, "PUT", "/admin/adapters/persona/alias", json={"version": "v1"})
    assert rolled.status_code == 200, rolled.text
    resp = ask(client, "persona")
    assert resp.model == "persona@v1" and is_upper_answer(resp.choices[0].message.content)

    split = {"version": "v1", "canary_version": "v2", "canary_weight": 0.5}
    assert admin(server, "PUT", "/admin/adapters/persona/alias", json=split).status_code == 200
    served = Counter(ask(client, "persona", max_tokens=1).model for _ in range(40))
    assert set(served) == {"persona@v1", "persona@v2"}, served
    assert 5 <= served["persona@v2"] <= 35, served

    bad = admin(server, "PUT", "/admin/adapters/persona/alias", json={"version": "v9"})
    assert bad.status_code == 404
    bad = admin(
        server, "PUT", "/admin/adapters/persona/alias",
        json={"version": "v1", "canary_version": "v2", "canary_weight": 3},
    )  # fmt: skip
    assert bad.status_code == 400
    conflict = admin(server, "DELETE", "/admin/adapters/persona/versions/v1")
    assert conflict.status_code == 409


def test_listing_reports_status_and_facts(server, client):
    register(server, "listed", SHIPPED / "uppercase", load=True)
    ask(client, "listed", max_tokens=2)
    info = admin(server, "GET", "/admin/adapters/listed").json()
    version = info["versions"][0]
    assert version["status"] == "loaded" and version["rank"] > 0
    assert "q_proj" in version["target_modules"] and version["size_bytes"] > 0
    assert version["load_seconds"] > 0 and version["requests"] >= 1
    names = [a["name"] for a in admin(server, "GET", "/admin/adapters").json()["data"]]
    assert "listed" in names


# --- bad adapters ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken(adapter_root, base_shapes, tmp_path_factory):
    return write_broken_adapters(
        adapter_root / "broken", base_shapes, tmp_path_factory.mktemp("outside")
    )


@pytest.mark.parametrize(
    "case, message",
    [
        ("over_rank", "max_lora_rank"),
        ("mismatched", "different base model"),
        ("bad_target", "do not exist in the base model"),
        ("corrupt", "unreadable"),
        ("no_config", "adapter_config.json is missing"),
        ("not_lora", "only LORA"),
        ("outside", "outside the adapter roots"),
        ("symlink_escape", "outside the adapter roots"),
    ],
)
@pytest.mark.parametrize("route", ["admin", "vllm"])
def test_bad_adapters_are_4xx_and_change_nothing(server, client, broken, case, message, route):
    before = model_ids(client)
    name = f"bad-{case.replace('_', '-')}"
    if route == "admin":
        resp = admin(
            server, "POST", "/admin/adapters", json={"name": name, "source": str(broken[case])}
        )
    else:
        resp = admin(
            server, "POST", "/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": str(broken[case])},
        )  # fmt: skip
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert message in error["message"] and error["code"] == 400
    assert model_ids(client) == before
    assert admin(server, "GET", f"/admin/adapters/{name}").status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"name": "../etc", "source": "adapters/uppercase"},
        {"name": "ok", "source": "adapters/../../etc"},
        {"name": "ok", "source": ""},
        {"name": "ok"},
        {"name": BASE_MODEL, "source": "adapters/uppercase"},
        {"name": "ok", "source": "hf://not a repo"},
        {"name": "ok", "source": "bentoml://no-such-model:v1"},
        {"name": "ok", "source": "adapters/uppercase", "rank": 3},
    ],
)
def test_bad_registration_requests_are_4xx(server, body):
    resp = admin(server, "POST", "/admin/adapters", json=body)
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.json()["error"]["message"]


def test_unknown_adapter_routes_are_404(server, client):
    assert admin(server, "GET", "/admin/adapters/nope").status_code == 404
    assert admin(server, "POST", "/admin/adapters/nope/pin").status_code == 404
    assert admin(server, "DELETE", "/admin/adapters/nope").status_code == 404
    with pytest.raises(openai.NotFoundError):
        ask(client, "nope@v1")


def test_server_still_healthy_after_bad_adapters(server, client):
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    assert "Paris" in ask(client, BASE_MODEL).choices[0].message.content


# --- just-in-time loading, LRU and pins ------------------------------------------------------
def test_concurrent_first_requests_share_one_load(server, adapter_root, base_shapes):
    register(server, "jit", write_adapter(adapter_root / "jit", base_shapes, seed=21))
    assert (
        admin(server, "GET", "/admin/adapters/jit").json()["versions"][0]["status"] == "registered"
    )

    async def burst() -> list[str]:
        aclient = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        results = await asyncio.gather(
            *(
                aclient.completions.create(model="jit", prompt="Hello", max_tokens=2)
                for _ in range(6)
            )
        )
        await aclient.close()
        return [r.model for r in results]

    assert asyncio.run(burst()) == ["jit@v1"] * 6
    assert metric(server, "loraswap_adapter_loads_total", adapter="jit") == 1
    assert metric(server, "loraswap_adapter_requests_total", adapter="jit") == 6


def test_lru_eviction_and_pins(server, client, adapter_root, base_shapes):
    names = [f"lru{i}" for i in range(10)]  # more than max_cpu_loras (8 on the test server)
    for i, name in enumerate(names):
        register(server, name, write_adapter(adapter_root / name, base_shapes, seed=100 + i))
    pin = admin(server, "POST", "/admin/adapters/lru0/pin")
    assert pin.status_code == 200 and pin.json()["pinned"]
    evictions = metric(server, "loraswap_adapter_evictions_total")
    for name in names:
        assert ask(client, name, max_tokens=1).model == f"{name}@v1"
    listing = {
        a["name"]: a["versions"][0]["status"]
        for a in admin(server, "GET", "/admin/adapters").json()["data"]
    }
    assert sum(s in ("loaded", "pinned") for s in listing.values()) <= 8
    assert listing["lru0"] == "pinned"
    assert metric(server, "loraswap_adapter_evictions_total") > evictions
    # Evicted adapters come back on demand.
    assert ask(client, "lru1", max_tokens=1).model == "lru1@v1"
    assert admin(server, "POST", "/admin/adapters/lru0/unpin").json()["pinned"] is False


def test_per_adapter_metrics(server, client):
    ask(client, "uppercase", max_tokens=8)
    for series in (
        "loraswap_adapter_requests_total",
        "loraswap_adapter_prompt_tokens_total",
        "loraswap_adapter_generation_tokens_total",
        "loraswap_adapter_loads_total",
        "loraswap_adapter_resident",
    ):
        assert metric(server, series, adapter="uppercase", version="v1") > 0, series
    with pytest.raises(openai.BadRequestError):
        ask(client, "uppercase", max_tokens=-3)
    assert metric(server, "loraswap_adapter_errors_total", adapter="uppercase") >= 1


# --- sources -------------------------------------------------------------------------------------
def test_s3_source_through_a_local_s3_server(server, client, s3, adapter_root, base_shapes):
    local = write_adapter(adapter_root / "s3-src", base_shapes, seed=31)
    for file in local.iterdir():
        s3["fs"].put(str(file), f"{s3['bucket']}/adapters/remote/{file.name}")
    info = register(server, "remote", f"s3://{s3['bucket']}/adapters/remote")
    assert info["versions"][0]["status"] == "registered"
    assert ask(client, "remote", max_tokens=3).model == "remote@v1"
    missing = admin(
        server, "POST", "/admin/adapters",
        json={"name": "ghost", "source": f"s3://{s3['bucket']}/adapters/none"},
    )  # fmt: skip
    assert missing.status_code == 400 and "adapter_config.json" in missing.text


def test_bentoml_model_source(server, client, adapter_root, base_shapes):
    import bentoml

    with bentoml.models.create("test-adapter-bento") as model:
        shutil.copytree(SHIPPED / "uppercase", Path(model.path), dirs_exist_ok=True)
    info = register(server, "from-store", f"bentoml://{model.tag}")
    assert info["created"]
    assert is_upper_answer(ask(client, "from-store").choices[0].message.content)


# --- isolation at the default dtype (and in fp32 in test_isolation.py) ----------------------
def test_mixed_batch_equals_solo_at_the_default_dtype(server, client, adapter_root):
    """After more adapters than engine slots were used, every request of a mixed batch gets
    exactly its solo greedy output on the default server, and base requests never get an
    adapter's behaviour (the vLLM CPU index bug).

    The default is batch-invariant (`dtype=auto` with `batch_invariant` on: float32 on CPU).
    In bf16 vLLM's own CPU kernels change outputs with batch composition even with LoRA off
    (measured: 12 of 32 base-only requests), so a bf16 server (batch_invariant off) is only
    checked for leaks; the LoRA ops themselves are batch-invariant in every dtype
    (test_lora_ops_patch.py)."""
    from tests.test_isolation import mixed_jobs, mixed_vs_solo, run_together

    dtype = httpx.get(f"{server.url}/info", timeout=30).json()["engine"]["dtype"]["value"]
    wrong, total = mixed_vs_solo(server.url, adapter_root, prefix="leak")
    adapter_wrong = [w for w in wrong if w[0][0] != BASE_MODEL]
    assert not adapter_wrong, f"{len(adapter_wrong)} of {total} differ: {adapter_wrong[:3]}"
    if dtype == "float32":
        assert not wrong, f"{len(wrong)} of {total} differ from solo: {wrong[:3]}"
    adapters = [f"leak-{kind}-{i}" for i in range(3) for kind in ("uppercase", "json")]
    jobs = mixed_jobs(adapters)
    for (model, _), text in zip(jobs, run_together(server.url, jobs), strict=True):
        if model == BASE_MODEL:
            assert not is_upper_answer(text) and not is_json_object(text), text
        elif "uppercase" in model:
            assert is_upper_answer(text), (model, text)
        else:
            assert is_json_object(text), (model, text)


def test_cli_manages_adapters_over_the_api(server):
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "loraswap", "adapters", "--url", server.url, *args],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    assert cli("register", "cli-made", str(SHIPPED / "uppercase")).returncode == 0
    listing = cli("list")
    assert listing.returncode == 0 and "cli-made" in listing.stdout and "v1*" in listing.stdout
    bad = cli("register", "cli-bad", "/etc")
    assert bad.returncode == 1 and "outside the adapter roots" in bad.stderr
    assert cli("delete", "cli-made").returncode == 0
    assert "cli-made" not in cli("list").stdout


def test_model_and_adapter_lists_page_with_limit_and_after(server, client):
    """`/v1/models` and `/admin/adapters` page in OpenAI's cursor style; the default page holds
    a small catalogue whole (the SDK's `models.list()` sees everything)."""
    full = admin(server, "GET", "/v1/models").json()
    assert full["has_more"] is False and full["last_id"] == full["data"][-1]["id"]
    assert [m.id for m in client.models.list()] == [m["id"] for m in full["data"]]
    for path, key in (("/v1/models", "id"), ("/admin/adapters", "name")):
        seen, after = [], None
        while True:
            query = "?limit=1" + (f"&after={after}" if after else "")
            page = admin(server, "GET", path + query).json()
            assert len(page["data"]) == 1
            seen += [item[key] for item in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == [item[key] for item in admin(server, "GET", path).json()["data"]]
        assert len(seen) >= 2  # several pages were walked
        resp = admin(server, "GET", f"{path}?after=no-such-entry")
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "after"


def test_adapter_memory_is_sized_at_start_and_shown(server, base_shapes):
    """The slots and the host tier come out of LORASWAP_ADAPTER_MEMORY_GIB for the base model's
    shapes (the test server sets the slot and host counts explicitly), and /info says so."""
    from loraswap.adapters import sizing

    engine = httpx.get(f"{server.url}/info", timeout=30).json()["engine"]
    assert engine["max_loras"]["value"] == 4 and engine["max_loras"]["source"] == "setting"
    assert engine["max_cpu_loras"]["value"] == 8
    dtype = engine["dtype"]["value"]
    slot = sizing.slot_bytes(base_shapes, 16, dtype)
    if not engine["lora_row_kernel"]["value"]:  # the torch ops' copies count too
        slot += sizing.ops_bytes(base_shapes, 16, dtype)
    assert engine["adapter_host_bytes"]["value"] == 2 * sizing.GIB - 4 * slot
    assert "MiB" in engine["adapter_host_bytes"]["reason"]

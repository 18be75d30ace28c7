"""Tenant boundaries on the real server (issue 27): where adapters may come from, for every key;
and what a tenant's key may see on every GET route the server publishes, /metrics included."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time

import pytest

from loraswap.routes import ROUTES
from tests.conftest import METRICS_TOKEN, ROOT_KEY, SHIPPED
from tests.listeners import victim
from tests.server import ROOT
from tests.test_access import request_for
from tests.test_tenants import call, ok


@pytest.fixture(scope="module")
def keys(tenanted):
    """Two tenants, north and south, each with a user and an admin key and one adapter of its
    own registered by its own admin; south has traffic, a file and a batch job."""
    made = {}
    for tenant in ("north", "south"):
        ok(call(tenanted, "POST", "/admin/tenants", ROOT_KEY,
                json={"name": f"walk-{tenant}", "adapters": [f"{tenant}-*"]}))  # fmt: skip
        for role in ("user", "admin"):
            path = f"/admin/tenants/walk-{tenant}/keys"
            made[f"{tenant}-{role}"] = ok(call(tenanted, "POST", path, ROOT_KEY,
                                               json={"role": role}))["key"]  # fmt: skip
    ok(call(tenanted, "POST", "/admin/adapters", made["north-admin"],
            json={"name": "north-lora", "source": "adapters/uppercase"}))  # fmt: skip
    ok(call(tenanted, "POST", "/admin/adapters", made["south-admin"],
            json={"name": "south-lora", "source": "adapters/json"}))  # fmt: skip
    for tenant in ("north", "south"):
        body = request_for("/v1/chat/completions", f"{tenant}-lora")
        ok(call(tenanted, "POST", "/v1/chat/completions", made[f"{tenant}-user"], json=body))
        line = {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": body}
        upload = ok(call(tenanted, "POST", "/v1/files", made[f"{tenant}-user"],
                         files={"file": ("in.jsonl", io.BytesIO(json.dumps(line).encode()))},
                         data={"purpose": "batch"}))  # fmt: skip
        job = ok(call(tenanted, "POST", "/v1/batches", made[f"{tenant}-user"],
                      json={"input_file_id": upload["id"], "endpoint": "/v1/chat/completions",
                            "completion_window": "24h"}))  # fmt: skip
        made[f"{tenant}-file"], made[f"{tenant}-batch"] = upload["id"], job["id"]
    return made


# --- sources ------------------------------------------------------------------------------------
def test_sources_outside_the_policy_are_400_for_every_key(tenanted, keys):
    """fsspec's other names for the disk, chains, memory, and a listener on this machine under
    several spellings: the tenant admin and the global admin both get the 400 that names the
    policy, on both registration routes, and the listener is never contacted."""
    with victim() as target:
        port = target.port
        refused = [f"local://{SHIPPED}/uppercase", f"simplecache::file://{SHIPPED}/uppercase",
                   f"filecache::local://{SHIPPED}/json", "memory://x/uppercase", "/etc",
                   f"http://127.0.0.1:{port}/x", f"http://[::1]:{port}/x",
                   f"http://2130706433:{port}/x", f"https://localhost:{port}/x",
                   f"ftp://127.0.0.1:{port}/x", f"sftp://127.0.0.1:{port}/x"]  # fmt: skip
        for key in (keys["north-admin"], ROOT_KEY):
            for source in refused:
                for path, body in (
                    ("/admin/adapters", {"name": "north-evil", "source": source}),
                    ("/v1/load_lora_adapter", {"lora_name": "north-evil", "lora_path": source}),
                ):
                    resp = call(tenanted, "POST", path, key, json=body)
                    assert resp.status_code == 400, (source, resp.text)
                    error = resp.json()["error"]
                    assert "LORASWAP_ADAPTER_SOURCES" in error["message"], error
                    assert error["type"] == "BadRequestError" and error["code"] == 400
        assert target.connections == []
    names = [a["name"] for a in ok(call(tenanted, "GET", "/admin/adapters", ROOT_KEY))["data"]]
    assert "north-evil" not in names
    # the hub is the global admin's by default, not a tenant's
    hub = call(tenanted, "POST", "/admin/adapters", keys["north-admin"],
               json={"name": "north-hub", "source": "hf://acme/lora"})  # fmt: skip
    assert hub.status_code == 400 and "tenant 'walk-north' may register from: roots" in hub.text


def test_a_tenant_registers_only_from_its_own_sources(tenanted, keys):
    admin = keys["north-admin"]
    shown = ok(call(tenanted, "PATCH", "/admin/tenants/walk-north", ROOT_KEY,
                    json={"sources": [f"{SHIPPED}/json"]}))  # fmt: skip
    assert shown["sources"] == [f"{SHIPPED}/json"]
    other = call(tenanted, "POST", "/admin/adapters", admin,
                 json={"name": "north-src", "source": "adapters/uppercase"})  # fmt: skip
    assert other.status_code == 400 and f"{SHIPPED}/json" in other.json()["error"]["message"]
    ok(call(tenanted, "POST", "/admin/adapters", admin,
            json={"name": "north-src", "source": "adapters/json"}))  # fmt: skip
    bad = call(tenanted, "PATCH", "/admin/tenants/walk-north", ROOT_KEY,
               json={"sources": ["simplecache::file:///"]})  # fmt: skip
    assert bad.status_code in (400, 422), bad.text
    assert ok(call(tenanted, "PATCH", "/admin/tenants/walk-north", ROOT_KEY,
                   json={"sources": None}))["sources"] is None  # fmt: skip
    ok(call(tenanted, "POST", "/admin/adapters", admin,
            json={"name": "north-src", "source": "adapters/uppercase"}))  # fmt: skip
    ok(call(tenanted, "DELETE", "/admin/adapters/north-src", admin))


# --- reads --------------------------------------------------------------------------------------
def get_routes(keys: dict[str, str]) -> list[str]:
    """Every GET route of the route table, templates filled with north's own objects."""
    fill = {"{model_id}": "north-lora", "{file_id}": keys["north-file"], "{name}": "north-lora",
            "{batch_id}": keys["north-batch"], "{token}": "wrong"}  # fmt: skip
    paths = []
    for route in ROUTES:
        if "GET" not in route.methods:
            continue
        path = route.path
        for template, value in fill.items():
            path = path.replace(template, value)
        if route.path == "/console/{name}":
            path = "/console/console.js"
        if route.path.startswith("/admin/tenants/"):
            path = "/admin/tenants/walk-north"
        paths.append(path)
    return paths


def test_a_tenant_key_finds_no_other_tenant_name_on_any_get_route(tenanted, keys):
    foreign = ("walk-south", "south-lora", keys["south-file"], keys["south-batch"])
    seen_by_root = ""
    for path in get_routes(keys):
        for key in (keys["north-user"], keys["north-admin"]):
            text = call(tenanted, "GET", path, key).text
            leaked = [name for name in foreign if name in text]
            assert not leaked, (path, leaked, text[:500])
        seen_by_root += call(tenanted, "GET", path, ROOT_KEY).text
    # the walk would find them: the global admin's answers name south
    assert all(name in seen_by_root for name in ("walk-south", "south-lora")), "walk finds nothing"


# Routes that take a name in the path or the query; {adapter} and {tenant} are filled with
# south's (foreign to north) and with names that do not exist (north's own pattern for the
# adapter). The last four answer the global admin differently for south's: they reach it.
NAME_PROBES = ["/admin/comparisons?adapter={adapter}", "/admin/usage?tenant={tenant}",
               "/admin/audit?adapter={adapter}", "/v1/models?after={adapter}",
               "/admin/adapters/{adapter}", "/v1/models/{adapter}"]  # fmt: skip


def test_a_tenant_key_probing_foreign_names_gets_the_answer_for_missing_ones(tenanted, keys):
    """Another tenant's adapter or tenant name in a query parameter or a path answers a tenant's
    key exactly as a name that does not exist (the same status and body, the name it sent
    echoed at most), and names nothing else of the other tenant."""
    foreign = {"adapter": "south-lora", "tenant": "walk-south"}
    missing = {"adapter": "north-missing", "tenant": "walk-nowhere"}

    def answer(probe: str, names: dict[str, str], key: str) -> tuple[int, str]:
        resp = call(tenanted, "GET", probe.format(**names), key)
        text = resp.text
        for field, value in names.items():
            text = text.replace(value, f"<{field}>")
        return resp.status_code, text

    for probe in NAME_PROBES:
        for key in (keys["north-user"], keys["north-admin"]):
            status, text = answer(probe, foreign, key)
            assert (status, text) == answer(probe, missing, key), (probe, status, text[:500])
            leaked = [n for n in ("walk-south", "south-lora", keys["south-file"]) if n in text]
            assert not leaked, (probe, leaked, text[:500])
    for probe in NAME_PROBES[2:]:  # the probes reach south's objects: the global admin's differ
        assert answer(probe, foreign, ROOT_KEY) != answer(probe, missing, ROOT_KEY), probe


def test_info_shows_a_key_its_models_and_the_server_to_global_admins(tenanted, keys):
    north = ok(call(tenanted, "GET", "/info", keys["north-admin"]))
    assert set(north) == {"base_model", "adapters", "versions"}
    assert [a["name"] for a in north["adapters"]] == ["north-lora"]
    root = ok(call(tenanted, "GET", "/info", ROOT_KEY))
    assert {"machine", "engine", "settings"} <= set(root)
    assert {"north-lora", "south-lora"} <= {a["name"] for a in root["adapters"]}
    assert root["settings"]["metrics_token"]["value"] == "<set>"
    assert root["settings"]["adapter_sources"]["value"]["allow"][0] == "roots"


def test_metrics_answer_to_the_scrape_token_and_global_keys_only(tenanted, keys):
    for key in (keys["north-user"], keys["north-admin"]):
        assert call(tenanted, "GET", "/metrics", key).status_code == 403
    for key in (None, "wrong"):
        assert call(tenanted, "GET", "/metrics", key).status_code == 401
    assert call(tenanted, "GET", "/metrics/wrong", None).status_code == 401
    assert call(tenanted, "GET", f"/metrics/{ROOT_KEY}", None).status_code == 401
    deadline = time.monotonic() + 30
    while "south-lora" not in (text := call(tenanted, "GET", "/metrics", ROOT_KEY).text):
        assert time.monotonic() < deadline, "south-lora never in /metrics"
        time.sleep(0.5)
    scraped = call(tenanted, "GET", "/metrics", METRICS_TOKEN)
    assert scraped.status_code == 200 and "south-lora" in scraped.text
    by_path = call(tenanted, "GET", f"/metrics/{METRICS_TOKEN}", None)
    assert by_path.status_code == 200 and "vllm:num_requests_waiting" in by_path.text
    assert "south-lora" in text
    assert METRICS_TOKEN not in tenanted.log_path.read_text(), "the token in the path is logged"


def test_readme_sources_block_runs_as_written(tenanted):
    """The README's sources block, with the loraswap CLI, against this server's tenant globex."""
    readme = (ROOT / "README.md").read_text()
    marker = r"<!-- example: run by tests/test_boundaries.py[^>]*-->\n\s*```bash\n(.*?)```"
    block = re.search(marker, readme, re.S)
    assert block, "the README's sources block is gone"
    ok(call(tenanted, "POST", "/admin/tenants", ROOT_KEY, json={"name": "globex"}))
    env = {**os.environ, "BENTOML_PORT": str(tenanted.port), "LORASWAP_ADMIN_API_KEY": ROOT_KEY,
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}  # fmt: skip
    done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + block[1]], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "s3://models/tenants/globex/" in done.stdout, done.stdout  # the first set took
    tenant = ok(call(tenanted, "GET", "/admin/tenants/globex", ROOT_KEY))
    assert not tenant.get("sources"), tenant  # the block ends back at tenant_default

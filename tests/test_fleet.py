"""The fleet test: two real replicas sharing PostgreSQL, Redis and S3 (moto) behind haproxy,
every client request through the balancer with the real ``openai`` SDK. Nothing depends on
which replica answers, and nothing is lost when a replica dies or both restart."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import psycopg
import pytest
from openai import OpenAI
from sqlalchemy.engine import make_url

from tests.conftest import SHIPPED
from tests.fleet import Balancer, Replica, core_of, shared_env, start_all
from tests.postgres_server import new_database
from tests.redis_server import redis_server_fixture  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]  # two engine starts in setup
ROOT_KEY = "fleet-root-key"
LEASE_S = 6


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, postgres_url, redis_server, s3, adapter_root):
    work = tmp_path_factory.mktemp("fleet")
    db_url = new_database(postgres_url, "fleet")
    env = shared_env(
        db_url, redis_server.uri, s3, "fleet",
        LORASWAP_ADMIN_API_KEYS=ROOT_KEY,
        LORASWAP_ADAPTER_ROOTS=json.dumps([str(SHIPPED), str(adapter_root)]),
        LORASWAP_BATCH_LEASE_S=str(LEASE_S),
        LORASWAP_BATCH_POLL_S="1",
        LORASWAP_REGISTRY_POLL_S="1",
        LORASWAP_LIMITS_FAIL_OPEN="false",
        # each replica's own core is part of vLLM's compile key: compiled, a fresh machine
        # would compile twice (~7 min) for a test of shared state, not of speed
        LORASWAP_ENFORCE_EAGER="true",
        # streams on two 1-core replicas, one of them starting, can outlast the default 30 s
        LORASWAP_DRAIN_S="60",
    )  # fmt: skip
    replicas = [Replica(work / name, env | core_of(i)) for i, name in enumerate(("a", "b"))]
    balancer = Balancer(work, [r.port for r in replicas])
    state = {"replicas": replicas, "balancer": balancer, "db_url": db_url, "work": work}
    left = []
    try:
        start_all(replicas)
        balancer.start()
        yield state
    finally:  # whatever failed, nothing is left running
        balancer.stop()
        for replica in state["replicas"]:
            left += replica.stop()
    assert not left, f"processes left: {[p.pid for p in left]}"


def sdk(url: str, key: str = ROOT_KEY) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def call(url: str, method: str, path: str, key: str = ROOT_KEY, **kw: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    return httpx.request(method, f"{url}{path}", headers=headers, timeout=300, **kw)


def eventually(check: Callable[[], Any], timeout: float = 20, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, httpx.HTTPError, openai.APIError):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {check}")
        time.sleep(every)


def chat_line(custom_id: str, max_tokens: int = 4) -> str:
    body = {"model": "smollm2-135m-instruct", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Say {custom_id}"}]}  # fmt: skip
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": body})  # fmt: skip


def run_batch(client: OpenAI, lines: list[str]) -> Any:
    upload = client.files.create(file=("in.jsonl", ("\n".join(lines) + "\n").encode()),
                                 purpose="batch")  # fmt: skip
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")  # fmt: skip


def wait_done(client: OpenAI, batch_id: str, timeout: float = 300) -> Any:
    def done() -> Any:
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in ("completed", "failed", "cancelled") else None

    return eventually(done, timeout, every=1)


def test_the_sdk_batch_round_trip_through_the_balancer(fleet):
    client = sdk(fleet["balancer"].url)
    batch = run_batch(client, [chat_line(f"r{i}") for i in range(6)])
    done = wait_done(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 6
    output = client.files.content(done.output_file_id).text.splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in output) == [f"r{i}" for i in range(6)]
    for replica in fleet["replicas"]:  # each object from each replica directly
        direct = sdk(replica.url)
        assert direct.batches.retrieve(batch.id).status == "completed"
        assert direct.files.retrieve(batch.input_file_id).purpose == "batch"
        assert direct.files.content(done.output_file_id).text.splitlines() == output


def test_an_adapter_registered_on_one_replica_is_served_by_the_other(fleet):
    a, b = (r.url for r in fleet["replicas"])
    made = call(a, "POST", "/admin/adapters",
                json={"name": "fleet-up", "source": str(SHIPPED / "uppercase")})  # fmt: skip
    assert made.status_code == 201, made.text

    def served_on_b() -> bool:
        reply = sdk(b).chat.completions.create(
            model="fleet-up", messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
        return reply.choices[0].message.content is not None

    eventually(served_on_b, timeout=10)
    assert call(b, "DELETE", "/admin/adapters/fleet-up").status_code == 200

    def gone_on_a() -> bool:
        try:
            sdk(a).chat.completions.create(
                model="fleet-up", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        except openai.NotFoundError:
            return True
        return False

    eventually(gone_on_a, timeout=10)


def tenant_key(url: str, name: str, **limits: int) -> str:
    made = call(url, "POST", "/admin/tenants", json={"name": name, "limits": limits})
    assert made.status_code == 201, made.text
    key = call(url, "POST", f"/admin/tenants/{name}/keys", json={"role": "user"})
    assert key.status_code == 201, key.text
    return key.json()["key"]


def ask(url: str, key: str, max_tokens: int) -> httpx.Response:
    body = {"model": "smollm2-135m-instruct", "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Count to ten."}]}  # fmt: skip
    return call(url, "POST", "/v1/chat/completions", key, json=body)


def wait_for_key(fleet: dict, key: str) -> None:
    """The new tenant reaches every replica within one poll of the shared directory."""
    for replica in fleet["replicas"]:
        eventually(lambda u=replica.url: call(u, "GET", "/v1/models", key).status_code == 200)


def test_tenant_token_and_concurrency_limits_hold_across_replicas(fleet):
    lb = fleet["balancer"].url
    budget = 100  # two requests' worth: both land within a minute even on a loaded machine
    key = tenant_key(lb, "fleet-tokens", tokens_per_minute=budget)
    wait_for_key(fleet, key)
    used, largest, refused = 0, 0, 0
    for _ in range(12):  # round robin: every other request lands on each replica
        resp = ask(lb, key, 24)
        if resp.status_code == 429:
            refused += 1
            assert resp.json()["error"]["message"]
            assert int(resp.headers["retry-after"]) >= 1
            if refused == 4:  # both replicas refuse, twice each
                break
            continue
        assert resp.status_code == 200, resp.text
        tokens = resp.json()["usage"]["total_tokens"]
        used, largest = used + tokens, max(largest, tokens)
    assert refused == 4
    assert budget <= used <= budget + largest, (used, largest)  # not 2x with two replicas

    key = tenant_key(lb, "fleet-inflight", max_concurrent=4)
    wait_for_key(fleet, key)
    with ThreadPoolExecutor(12) as pool:
        codes = [r.status_code for r in pool.map(lambda _: ask(lb, key, 32), range(12))]
    assert set(codes) <= {200, 429}, codes
    assert 1 <= codes.count(200) <= 4, codes  # 4 in flight across both, not 4 on each


def test_usage_and_audit_read_the_same_from_either_replica(fleet):
    a, b = (r.url for r in fleet["replicas"])

    def same(path: str) -> Any:
        left, right = call(a, "GET", path).json(), call(b, "GET", path).json()
        return left if left == right and left["data"] else None

    usage = eventually(lambda: same("/admin/usage"), timeout=20, every=1)
    assert {row["tenant"] for row in usage["data"]} >= {"fleet-tokens", "fleet-inflight"}
    audit = eventually(lambda: same("/admin/audit"))
    actions = [(e["action"], e["adapter"]) for e in audit["data"]]
    assert ("register", "fleet-up") in actions and ("delete", "fleet-up") in actions


def lease_holder(db_url: str, batch_id: str) -> str | None:
    url = make_url(db_url)
    dsn = f"host={url.host} port={url.port} user={url.username} dbname={url.database}"
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT lease_owner FROM batches WHERE id = %s", (batch_id,)).fetchone()
    return row[0] if row else None


def test_a_batch_job_survives_the_death_of_its_replica(fleet):
    lb = fleet["balancer"].url
    client = sdk(lb)
    batch = run_batch(client, [chat_line(f"id{i}", max_tokens=8) for i in range(200)])
    holder = eventually(lambda: lease_holder(fleet["db_url"], batch.id))
    pid = int(holder.split("-")[-2])
    (victim,) = [r for r in fleet["replicas"] if pid in r.pids()]
    eventually(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 60,
               timeout=300, every=0.5)  # fmt: skip
    victim.kill()
    killed_at = time.monotonic()
    taken = eventually(lambda: lease_holder(fleet["db_url"], batch.id) not in (None, holder),
                       timeout=LEASE_S + 10)  # fmt: skip
    assert taken
    assert time.monotonic() - killed_at <= LEASE_S + 3  # within the lease time (and a poll)
    done = wait_done(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed) == (200, 200)
    output = client.files.content(done.output_file_id).text.splitlines()
    ids = [json.loads(x)["custom_id"] for x in output]
    assert len(ids) == 200 and set(ids) == {f"id{i}" for i in range(200)}  # each exactly once
    restarted = victim.restart_like()
    fleet["replicas"][fleet["replicas"].index(victim)] = restarted
    restarted.start()


def snapshot(url: str) -> dict[str, Any]:
    client = sdk(url)
    return {
        "files": sorted(f.id for f in client.files.list()),
        "batches": sorted((b.id, b.status) for b in client.batches.list()),
        "usage": call(url, "GET", "/admin/usage").json()["data"],
        "audit": call(url, "GET", "/admin/audit?limit=1000").json()["data"],
        "tenants": sorted(t["name"] for t in call(url, "GET", "/admin/tenants").json()["data"]),
    }


def kept(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What ``before`` held that ``after`` lost (the fleet only adds while it rolls)."""
    lost = [f"{kind}: {item}" for kind in ("files", "tenants", "audit")
            for item in before[kind] if item not in after[kind]]  # fmt: skip
    done = {bid for bid, status in after["batches"]}
    lost += [f"batch {bid}" for bid, _ in before["batches"] if bid not in done]
    key = ("tenant", "model", "day", "source")
    totals = {tuple(r[k] for k in key): r for r in after["usage"]}
    counts = ("requests", "prompt_tokens", "completion_tokens")
    for row in before["usage"]:
        now = totals.get(tuple(row[k] for k in key))
        if now is None or any(now[c] < row[c] for c in counts):
            lost.append(f"usage {row}")
    return lost


def test_a_rolling_update_drops_nothing_and_loses_nothing(fleet):
    """Each replica in turn gets SIGTERM, as Kubernetes sends it, and a successor on its port,
    under steady streaming load through the balancer and with a batch job running: no request
    fails, no stream is cut, the job completes with every line exactly once, and every file,
    job, tenant, usage row and audit entry from before both restarts is still there."""
    lb = fleet["balancer"].url
    client = sdk(lb)
    time.sleep(6)  # one usage flush interval: what was counted is written
    before = snapshot(lb)
    assert before["files"] and before["batches"] and before["usage"] and before["audit"]
    batch = run_batch(client, [chat_line(f"roll{i}", max_tokens=8) for i in range(40)])
    stop, outcomes = threading.Event(), []

    def stream_until_stopped() -> None:
        streams = sdk(lb)
        while not stop.is_set():
            began = time.monotonic()
            try:
                chunks = streams.chat.completions.create(
                    model="smollm2-135m-instruct", max_tokens=16, stream=True,
                    messages=[{"role": "user", "content": "Count to ten."}],
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                finish = [c.choices[0].finish_reason for c in chunks if c.choices]
                outcome = "ok" if finish[-1:] == ["length"] else f"cut: {finish[-3:]}"
            except Exception as exc:  # any failure at all is what this test counts
                outcome = f"failed: {exc!r}"
            outcomes.append((outcome, round(time.monotonic() - began, 1)))

    # one client streaming back to back: steady load that two 1-core replicas, one of them
    # starting, still serve (two such clients starve the replica left serving on 2 cores)
    load = [threading.Thread(target=stream_until_stopped)]
    for thread in load:
        thread.start()
    try:
        for index, replica in enumerate(list(fleet["replicas"])):
            time.sleep(3)  # streams in flight on both replicas
            assert not replica.stop(), "processes left after SIGTERM"
            assert "drained in" in replica.log_path.read_text(errors="replace")
            successor = replica.restart_like()
            fleet["replicas"][index] = successor
            successor.start()
            time.sleep(2)  # the balancer's health check takes it back
        time.sleep(3)
    finally:
        stop.set()
        for thread in load:
            thread.join(timeout=300)
    failed = [o for o in outcomes if o[0] != "ok"]
    assert len(outcomes) >= 10 and not failed, (len(outcomes), failed[:5], outcomes)
    done = wait_done(client, batch.id, timeout=600)
    assert done.status == "completed", done
    errors = client.files.content(done.error_file_id).text[:2000] if done.error_file_id else ""
    counts = (done.request_counts.total, done.request_counts.completed)
    assert counts == (40, 40), (counts, errors)
    output = client.files.content(done.output_file_id).text.splitlines()
    ids = [json.loads(x)["custom_id"] for x in output]
    assert len(ids) == 40 and set(ids) == {f"roll{i}" for i in range(40)}  # each exactly once
    for replica in fleet["replicas"]:
        assert kept(before, snapshot(replica.url)) == []

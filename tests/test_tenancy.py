"""Tenants without a server: the directory (hashed keys, rotation, compare-and-swap writes), the
limiter (429s and their Retry-After), the usage ledger (durable totals, bounded labels) and the
pipeline's access rule."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace

import limits.aio.storage.memory
import pytest
from pydantic import ValidationError

import loraswap.tenants.limits
from loraswap.adapters.keys import AdapterKey
from loraswap.config import Settings
from loraswap.errors import ApiError
from loraswap.pipeline import RequestPipeline
from loraswap.storage import Database
from loraswap.tenants import Limits, Tenancy, Tenant
from loraswap.tenants.directory import TenantDirectory, TenantStore
from loraswap.tenants.limits import TenantLimiter
from loraswap.tenants.principal import ANONYMOUS, DEFAULT_USER, GLOBAL_ADMIN, Principal
from loraswap.tenants.usage import MAX_MODELS_PER_TENANT, UsageLedger


def directory(tmp_path: Path, **settings) -> TenantDirectory:
    s = Settings(state_dir=tmp_path, tenants_uri=str(tmp_path / "tenants.json"), **settings)
    found = TenantDirectory(s, TenantStore(s.tenants_uri))
    found.load()
    return found


def test_tenant_names_and_adapter_patterns():
    acme = Tenant(name="acme", adapters=["acme-*", "shared-faq"])
    assert acme.owns("acme-support") and acme.owns("shared-faq")
    assert not acme.owns("shared-faq-2") and not acme.owns("beta-x")
    for bad in ({"name": "admin"}, {"name": "Acme"}, {"name": "a", "adapters": ["*"]},
                {"name": "a", "adapters": ["a*b*"]}):  # fmt: skip
        with pytest.raises(ValidationError):
            Tenant(**bad)


def test_keys_are_hashed_rotated_and_revoked(tmp_path: Path):
    async def main() -> None:
        open_server = directory(tmp_path / "open")
        assert open_server.authenticate(None) is ANONYMOUS  # no keys anywhere: the open demo
        with pytest.raises(ApiError) as locked_out:  # a first tenant would lock it for good
            await open_server.create(Tenant(name="acme"))
        assert (
            locked_out.value.status == 400 and "LORASWAP_ADMIN_API_KEYS" in locked_out.value.message
        )
        tenants = directory(tmp_path, admin_api_keys=["root"])
        await tenants.create(Tenant(name="acme", adapters=["acme-*"]))
        assert tenants.authenticate(None) is None
        first, plain = await tenants.add_key("acme", "admin", "ci")
        who = tenants.authenticate(plain)
        assert who is not None and who.name == "acme" and who.admin and who.key_id == first.id
        second, plain2 = await tenants.add_key("acme")
        await tenants.revoke_key("acme", first.id)
        assert tenants.authenticate(plain) is None
        assert tenants.authenticate(plain2).name == "acme"
        assert not tenants.authenticate(plain2).admin
        stored = (tmp_path / "tenants.json").read_text()
        assert plain not in stored and plain2 not in stored and second.sha256 in stored
        assert (tmp_path / "tenants.json").stat().st_mode & 0o777 == 0o600
        with pytest.raises(ApiError) as exists:
            await tenants.create(Tenant(name="acme"))
        assert exists.value.status == 409

    asyncio.run(main())


def test_static_keys_keep_working(tmp_path: Path):
    tenants = directory(tmp_path, api_keys=["u1"], admin_api_keys=["root"])
    assert tenants.authenticate("root") is GLOBAL_ADMIN
    assert tenants.authenticate("u1") is DEFAULT_USER
    assert tenants.authenticate("nope") is None
    only_users = directory(tmp_path / "b", api_keys=["u1"])
    assert only_users.authenticate("u1") is GLOBAL_ADMIN  # admin keys default to the API keys


def test_two_replicas_writing_tenants_lose_nothing(tmp_path: Path):
    """Two directories on one document (two replicas) adding tenants at once: all land."""

    async def main() -> None:
        a, b = (directory(tmp_path, admin_api_keys=["root"]) for _ in range(2))
        await asyncio.gather(
            *(a.create(Tenant(name=f"a{i}")) for i in range(6)),
            *(b.create(Tenant(name=f"b{i}")) for i in range(6)),
        )
        stored = json.loads((tmp_path / "tenants.json").read_text())
        assert len(stored["tenants"]) == 12 and stored["revision"] == 12

    asyncio.run(main())


def tenant_principal(**limits) -> Principal:
    return Principal("acme", Tenant(name="acme", limits=Limits(**limits)), admin=False)


def test_limiter_concurrency_requests_and_tokens_per_minute(monkeypatch: pytest.MonkeyPatch):
    now = [1000.0]
    clock = SimpleNamespace(time=lambda: now[0], monotonic=time.monotonic)
    for module in (limits.aio.storage.memory, loraswap.tenants.limits):  # the library's clock too
        monkeypatch.setattr(module, "time", clock)
    limiter = TenantLimiter()
    acme = tenant_principal(max_concurrent=2, requests_per_minute=3, tokens_per_minute=100)

    async def scenario() -> None:
        assert await limiter.acquire(acme) and await limiter.acquire(acme)
        with pytest.raises(ApiError) as busy:
            await limiter.acquire(acme)
        assert busy.value.status == 429 and busy.value.headers["retry-after"] == "1"
        await limiter.release(acme)
        now[0] += 10
        await limiter.acquire(acme)  # third request of the minute
        await limiter.release(acme)
        await limiter.release(acme)
        with pytest.raises(ApiError) as rpm:
            await limiter.acquire(acme)
        assert "requests per minute" in rpm.value.message
        assert rpm.value.headers["retry-after"] == "50"  # the first one leaves the window at +60
        now[0] += 51
        await limiter.acquire(acme)
        await limiter.add_tokens(acme, 120)
        await limiter.release(acme)
        with pytest.raises(ApiError) as tpm:
            await limiter.acquire(acme)
        assert "tokens per minute" in tpm.value.message
        # 120 tokens 41 s into the minute [1020, 1080): 19 s to its end, then 120 * (60 - s)/60
        # < 100 after s = 10 s
        assert tpm.value.headers["retry-after"] == "29"
        now[0] += 61
        assert await limiter.acquire(acme)
        assert await limiter.acquire(DEFAULT_USER) is False  # not a tenant: no tenant limits

    asyncio.run(scenario())


def test_usage_is_durable_and_its_labels_bounded(tmp_path: Path):
    ledger = UsageLedger(Database.embedded(tmp_path), flush_s=0)
    ledger.record("acme", "acme-up@v1", 10, 5)
    ledger.record("acme", "acme-up@v1", 7, 3)
    ledger.record("acme", "base", 4, 4, source="batch")
    ledger.flush()
    ledger.record("acme", "base", 1, 1, source="batch")  # pending, not flushed yet
    assert ledger.batch_tokens_today("acme") == 10
    again = UsageLedger(Database.embedded(tmp_path), flush_s=0)  # a restarted server
    ledger.flush()
    rows = {(r["model"], r["source"]): r for r in again.report("acme")}
    assert rows[("acme-up@v1", "api")]["requests"] == 2
    assert rows[("acme-up@v1", "api")]["prompt_tokens"] == 17
    assert rows[("acme-up@v1", "api")]["completion_tokens"] == 8
    assert rows[("base", "batch")]["requests"] == 2
    for i in range(MAX_MODELS_PER_TENANT + 5):
        ledger.record("many", f"m{i}", 1, 1)
    assert len(ledger.labels["many"]) == MAX_MODELS_PER_TENANT + 1  # and "other"


def test_pipeline_access_rule_is_one_404_for_unknown_and_foreign(tmp_path: Path):
    settings = Settings(state_dir=tmp_path)
    pipeline = RequestPipeline(settings, tenancy=Tenancy(settings))
    base = settings.served_model_name
    acme = Principal("acme", Tenant(name="acme", adapters=["acme-*"], base_model=False), False)
    errors = []
    for model, key in (("beta-x", AdapterKey("beta-x", "v1")), ("nope", None), (base, None)):
        with pytest.raises(ApiError) as refused:
            pipeline.check_access(acme, model, key)
        errors.append(refused.value)
    assert {e.status for e in errors} == {404}
    assert errors[0].message == "The model `beta-x` does not exist."
    assert errors[1].message == "The model `nope` does not exist."
    pipeline.check_access(acme, "acme-up", AdapterKey("acme-up", "v1"))
    pipeline.check_access(ANONYMOUS, "beta-x", AdapterKey("beta-x", "v1"))

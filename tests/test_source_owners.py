"""A registered adapter fetched again (a restart, another replica) is held to the source limits
of whoever registered it, as they are then: narrowing a tenant's `sources` reaches what it
registered before (issue 27), without a real engine (the registry runs on a stand-in)."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import pytest

from loraswap.adapters.keys import AdapterKey
from loraswap.adapters.owners import registrant
from loraswap.adapters.registry import AdapterRegistry
from loraswap.config import Settings
from loraswap.source_policy import Caller, SourcePolicy
from loraswap.tenants import CURRENT
from loraswap.tenants.directory import TenantDirectory, TenantStore
from loraswap.tenants.model import Tenant
from loraswap.tenants.principal import ANONYMOUS, GLOBAL_ADMIN, Principal
from tests.conftest import SHIPPED
from tests.test_residency import FakeEngine


def test_the_registrant_decides_whose_limits_apply():
    policy = SourcePolicy(tenant_default=["roots"])
    tenants = {"acme": Tenant(name="acme", adapters=["acme-*"], sources=["s3://b/acme/"]),
               "beta": Tenant(name="beta", adapters=["acme-shared", "beta-*"])}  # fmt: skip
    for name in (GLOBAL_ADMIN.name, ANONYMOUS.name):  # whoever owns the name: admin_extra too
        assert registrant("acme-x", name, tenants, policy) == Caller()
    assert registrant("x", "default", tenants, policy) == Caller(admin=False)
    assert registrant("acme-x", "acme", tenants, policy) == Caller(
        tenant="acme", sources=("s3://b/acme/",)
    )
    assert registrant("beta-x", "beta", tenants, policy) == Caller(tenant="beta")  # its default
    assert registrant("gone-x", "gone", tenants, policy) == Caller(tenant="gone")  # deleted
    # stored before `registered_by`: the tenants owning the name, any of them; else an admin's
    assert registrant("acme-x", None, tenants, policy).sources == ("s3://b/acme/",)
    both = registrant("acme-shared", None, tenants, policy)
    assert both.tenant == "acme, beta" and both.sources == ("s3://b/acme/", "roots")
    assert registrant("other", None, tenants, policy) == Caller()


def test_a_refetch_reads_the_tenants_as_stored_not_this_replica_copy(tmp_path: Path, monkeypatch):
    """Another replica created the tenant (and its sources) a moment ago: this one's copy does
    not have it yet, what the registry reads does; an unreadable store falls back to the copy."""
    settings = Settings(state_dir=tmp_path, tenants_uri=str(tmp_path / "t.json"),
                        admin_api_keys=["root"])  # fmt: skip
    here, there = (TenantDirectory(settings, TenantStore(settings.tenants_uri)) for _ in "ab")
    here.load()
    asyncio.run(there.create(Tenant(name="acme", sources=["s3://b/acme/"])))
    assert "acme" not in here.state.tenants and here.stored()["acme"].sources == ["s3://b/acme/"]

    def unreadable() -> None:
        raise OSError("unreadable")

    monkeypatch.setattr(here.store, "load", unreadable)
    assert here.stored() is here.state.tenants


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Settings]:
    """Adapter roots with a directory per purpose; the policy allows two of them for every key
    and a third (ops) for global admins only."""
    root = tmp_path / "adapters"
    for part in ("acme", "acme2", "ops"):
        shutil.copytree(SHIPPED / "uppercase", root / part / "lora")
    policy = SourcePolicy(allow=[f"{root}/acme/", f"{root}/acme2/"], tenant_default=[],
                          admin_extra=[f"{root}/ops/"])  # fmt: skip
    settings = Settings(
        adapter_roots=[root], registry_uri=str(tmp_path / "registry.json"),
        state_dir=tmp_path / "state", adapter_cache_dir=tmp_path / "cache", registry_poll_s=0,
        adapter_sources=policy,
    )  # fmt: skip
    return root, settings


def test_narrowing_a_tenant_sources_stops_the_next_fetch_of_what_it_registered(
    layout, base_shapes, caplog
):
    root, settings = layout
    acme = Tenant(name="acme", adapters=["acme-*"], sources=[f"{root}/acme/", f"{root}/acme2/"])
    tenants = {"acme": acme}

    def replica() -> AdapterRegistry:
        return AdapterRegistry(settings, base_shapes, FakeEngine(), tenants=lambda: tenants)

    async def register() -> None:
        registry = replica()
        await registry.restore()
        token = CURRENT.set(Principal("acme", acme, admin=True))
        try:
            await registry.register("acme-x", f"{root}/acme/lora")
            await registry.register("acme-y", f"{root}/acme2/lora")
        finally:
            CURRENT.reset(token)
        token = CURRENT.set(GLOBAL_ADMIN)  # for acme, from where only global admins may
        try:
            await registry.register("acme-ops", f"{root}/ops/lora")
        finally:
            CURRENT.reset(token)
        await registry.close()

    async def restart() -> AdapterRegistry:
        registry = replica()
        await registry.restore()
        await registry.close()
        return registry

    asyncio.run(register())
    acme.sources = [f"{root}/acme/"]  # narrowed (as PATCH /admin/tenants/acme stores it)
    with caplog.at_level(logging.ERROR, logger="loraswap.adapters.registry"):
        after = asyncio.run(restart())
    assert after.resolve("acme-x") is not None, "still within acme's sources"
    assert after.resolve("acme-ops") is not None, "a global admin's registration keeps admin_extra"
    assert after.resolve("acme-y") is None
    facts = after.describe("acme-y")["versions"][0]
    assert facts["status"] == "broken" and "LORASWAP_ADAPTER_SOURCES" in facts["error"]
    # the owner sees that its source is now outside, not what the policy lists (for a name two
    # tenants own, that would be the other's prefixes)
    assert "for the key that registered it" in facts["error"]
    assert "may register from" not in facts["error"]
    assert "acme-y@v1 cannot be served" in caplog.text
    assert "registered_by" not in facts, "who registered is not shown (another tenant's name)"

    tenants.clear()  # acme deleted: what it registered is held to tenant_default (nothing here)
    after = asyncio.run(restart())
    assert after.resolve("acme-x") is None and after.resolve("acme-ops") is not None
    assert after.residency.broken.keys() == {AdapterKey("acme-x", "v1"), AdapterKey("acme-y", "v1")}

"""The adapter source policy on its own: every protocol fsspec knows, every spelling that once
passed for a listed source, tenants' prefixes, the global admin's extras."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
from fsspec.registry import known_implementations
from pydantic import ValidationError

from loraswap.adapters.sources import materialize
from loraswap.adapters.validation import AdapterInvalid
from loraswap.config import Settings
from loraswap.source_policy import Caller, SourcePolicy, SourceRefused
from loraswap.tenants.model import Tenant

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "adapters"
ROOTS = [SHIPPED]
PROTOCOLS = sorted(set(known_implementations) | set(fsspec.available_protocols()))


def allowed(policy: SourcePolicy, source: str, **who: object) -> bool:
    try:
        policy.check(source, ROOTS, **who)
    except SourceRefused as exc:
        assert "LORASWAP_ADAPTER_SOURCES" in str(exc), exc
        return False
    return True


def spellings(protocol: str) -> list[str]:
    """Two ways a source of ``protocol`` is written: a bucket or host and a path, and an
    absolute path (a shipped adapter's, inside the adapter roots)."""
    if protocol == "hf":  # the hub's own shape: org/name
        return ["hf://bucket/x"]
    return [f"{protocol}://bucket/adapters/x", f"{protocol}://{SHIPPED}/uppercase"]


def test_fsspec_knows_many_protocols():
    assert len(PROTOCOLS) >= 40 and {"local", "memory", "ftp", "simplecache", "http"} <= set(
        PROTOCOLS
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_fsspec_protocol_is_refused_unless_listed(protocol):
    default = SourcePolicy()
    if protocol == "file":  # file:// is a local path: the adapter roots decide, for everyone
        for who in ({}, {"tenant": "acme", "tenant_sources": None}):
            assert allowed(default, f"file://{SHIPPED}/json", **who)
            assert not allowed(default, "file:///etc/passwd", **who)
            assert not allowed(default, "file://bucket/adapters/x", **who)
        return
    by_default = {"s3", "hf"}  # the shipped policy: roots, hf://, s3://, bentoml://
    for source in spellings(protocol):
        expected = protocol in by_default  # s3:///abs/path is still S3 (bucket "abs")
        assert allowed(default, source) is expected, source
        assert not allowed(default, source, tenant="acme", tenant_sources=None), source
    entry = f"{protocol}://bucket/" if protocol in ("http", "https") else f"{protocol}://"
    listed = SourcePolicy(allow=[entry])  # http(s) by host, any other protocol by name
    source = f"{protocol}://bucket/adapters/x" if protocol != "hf" else "hf://org/x"
    assert allowed(listed, source)
    for other in PROTOCOLS:
        if other != protocol:
            assert not allowed(listed, f"{other}://bucket/adapters/x"), other
    # never chained, even with both ends listed
    both = SourcePolicy(allow=[entry, "simplecache://", "file://x", "roots"])
    for chained in (f"simplecache::{protocol}://bucket/x", f"{protocol}::file://{SHIPPED}/json",
                    f"{protocol}://bucket/x::s3://b/y"):  # fmt: skip
        assert not allowed(both, chained), chained


@pytest.mark.parametrize(
    "source",
    [
        "local://" + str(SHIPPED / "uppercase"),  # fsspec's other names for the disk
        "simplecache::file://" + str(SHIPPED / "uppercase"),
        "filecache::file:///etc",
        "file:///etc",
        "/etc",
        "adapters/../../etc",
        "memory://x/uppercase",
        "ftp://127.0.0.1/x",
        "http://127.0.0.1:1/x",
        "S3://bucket/x",  # fsspec would not know it; nor do we
        "s3://bucket/x/../y",
        "s3://bucket/x/./y",
        "s3://bucket//x",
        "s3://bucket/x%2f..%2fy",
        "s3://key:secret@bucket/x",
        "s3://bucket/x?versionId=1",
        "s3://bucket/x*",
        "s3://bucket/[ab]",
        " s3://bucket/x",
        "s3://bucket/x\\y",
        "s3://",
        "hf://acme",
        "hf://acme/x@../../y",
        "bentoml://",
        "",
    ],
)
def test_the_default_policy_refuses(source):
    assert not allowed(SourcePolicy(), source)


@pytest.mark.parametrize(
    "source",
    ["adapters/uppercase", str(SHIPPED / "json"), f"file://{SHIPPED}/json", "hf://acme/lora-x@v2",
     "hf://Acme/lora-x", "s3://bucket/adapters/x", "s3://bucket/adapters/x/",
     "bentoml://adapter-x:v1", "bentoml://adapter-x"],
)  # fmt: skip
def test_the_default_policy_keeps_what_shipped_for_the_global_admin(source):
    assert allowed(SourcePolicy(), source)


def test_a_tenant_registers_from_its_own_prefixes_within_allow():
    policy = SourcePolicy(allow=["roots", "s3://models/tenants/", "hf://acme-org"])
    mine = ["s3://models/tenants/acme/", f"{SHIPPED}/json", "hf://ACME-org"]
    acme = {"tenant": "acme", "tenant_sources": mine}
    assert allowed(policy, "s3://models/tenants/acme/x", **acme)
    assert allowed(policy, "s3://models/tenants/acme", **acme)
    assert allowed(policy, "adapters/json", **acme)
    assert allowed(policy, "hf://acme-org/x@main", **acme)
    for foreign in ("s3://models/tenants/acme-evil/x", "s3://models/tenants/beta/x",
                    "s3://models/tenants/acme/../beta/x", "adapters/uppercase",
                    "hf://acme-org-evil/x", "s3://models/other/acme/x",
                    "s3://models/tenants/acme/..;/beta/x"):  # fmt: skip
        assert not allowed(policy, foreign, **acme), foreign
    # its sources never widen the deployment's: s3://elsewhere is not in `allow`
    wide = {"tenant": "acme", "tenant_sources": ["s3://", "*"]}
    assert not allowed(policy, "s3://elsewhere/x", **wide)
    assert allowed(policy, "s3://models/tenants/beta/x", **wide)
    # no sources of its own: the policy's tenant_default (the roots)
    assert allowed(policy, "adapters/uppercase", tenant="acme", tenant_sources=None)
    assert not allowed(policy, "s3://models/tenants/acme/x", tenant="acme", tenant_sources=None)
    assert not allowed(policy, "adapters/uppercase", tenant="acme", tenant_sources=[])


def test_a_trailing_star_matches_by_name_prefix():
    policy = SourcePolicy(allow=["bentoml://acme-*", "s3://b/acme-*", "hf://acme-*"])
    assert allowed(policy, "bentoml://acme-support:v2")
    assert allowed(policy, "s3://b/acme-one/x")
    assert allowed(policy, "hf://acme-labs/x")
    assert not allowed(policy, "bentoml://beta:v1")
    assert not allowed(policy, "s3://b/beta/acme-x")


def test_the_global_admin_gets_admin_extra_and_no_one_else():
    policy = SourcePolicy(allow=["roots"], admin_extra=["s3://ops/"])
    assert allowed(policy, "s3://ops/x")
    assert not allowed(policy, "s3://ops/x", admin=False)
    assert not allowed(policy, "s3://ops/x", tenant="acme", tenant_sources=["s3://ops/"])
    anything = SourcePolicy(allow=["roots"], admin_extra=["*"])
    assert allowed(anything, "gs://bucket/x")
    assert not allowed(anything, "simplecache::gs://bucket/x")


def test_http_sources_name_their_host():
    policy = SourcePolicy(allow=["https://models.example.com/adapters/"])
    assert allowed(policy, "https://models.example.com/adapters/x")
    assert allowed(policy, "https://MODELS.example.com:443/adapters/x")
    for source in ("https://models.example.com/other/x", "http://models.example.com/adapters/x",
                   "https://models.example.com:8443/adapters/x",
                   "https://models.example.com@127.0.0.1/adapters/x",
                   "https://models.example.com.evil.test/adapters/x",
                   "https://models.example.com/adapters/../x"):  # fmt: skip
        assert not allowed(policy, source), source
    with pytest.raises(ValidationError, match="name a host"):
        SourcePolicy(allow=["https://"])


def test_a_redirect_is_checked_as_its_source_was_for_the_same_caller():
    """Issue 27's redirect: every hop passes the registration check of the source's caller,
    path included, never the union of what some key may use. The query is not checked."""
    policy = SourcePolicy(
        allow=["roots", "https://acme.example.com/acme/", "https://acme.example.com/beta/"],
        admin_extra=["http://artifacts.internal/"], private_networks=["10.0.0.0/8"],
    )  # fmt: skip
    acme = Caller(tenant="acme", sources=("https://acme.example.com/acme/",))
    policy.check_hop("https://acme.example.com/acme/x/adapter_config.json?sig=1#top", [], acme)
    for hop in ("http://artifacts.internal/ops-only/adapter_config.json",  # admin_extra
                "https://acme.example.com/beta/x/adapter_config.json",  # beta's, in `allow`
                "https://acme.example.com/acme/../beta/x", "https://acme.example.com/acme/%2e%2e/beta",
                "https://acme.example.com/acme/..;/beta/x", "https://acme.example.com/acme/x;p=1",
                "https://acme.example.com/acmex/y", "http://acme.example.com/acme/x",
                "https://a@acme.example.com/acme/x", "http://10.0.0.1/acme/x"):  # fmt: skip
        with pytest.raises(SourceRefused, match="LORASWAP_ADAPTER_SOURCES"):
            policy.check_hop(hop, [], acme)
    policy.check_hop("http://artifacts.internal/ops-only/x", [], Caller())  # a global admin's
    with pytest.raises(SourceRefused):  # LORASWAP_API_KEYS keys get `allow` only
        policy.check_hop("http://artifacts.internal/ops-only/x", [], Caller(admin=False))
    admin = SourcePolicy(allow=["https://models.example.com/adapters/"])
    with pytest.raises(SourceRefused):  # the path counts for a global admin too
        admin.check_hop("https://models.example.com/cdn/x?sig=1", [], Caller())


@pytest.mark.parametrize(
    "source",
    ["adapters/a\x00b", "adapters/json\x00", "file://adapters/a\x00b", "adapters/a\nb",
     "adapters/\x7f", "adapters/\x85x", "adapters/a\u202eb", "adapters/\u200bjson",
     "adapters/\udc80", "s3://bucket/a\x00b", "hf://org/a\x00", "bentoml://a\x00",
     "https://acme.example.com/a\x00b", "~no-such-user-27/adapters/json"],
)  # fmt: skip
def test_control_characters_and_unreadable_paths_are_the_policy_refusal(source):
    """A NUL made Path.resolve raise ValueError (a 500 at the route); now every such source is
    the policy's SourceRefused (the route's 400), for every key, below the routes too."""
    for who in ({}, {"tenant": "acme", "tenant_sources": ["roots"]}):
        assert not allowed(SourcePolicy(allow=["roots", "s3://", "hf://", "bentoml://", "*"]),
                           source, **who)  # fmt: skip
    with pytest.raises(AdapterInvalid, match="LORASWAP_ADAPTER_SOURCES"):
        materialize(source, name="x", version="v1", roots=ROOTS, cache_dir=Path("/nonexistent"))
    with pytest.raises(ValidationError):
        Tenant(name="acme", sources=[source])


def test_the_policy_is_read_from_the_environment_and_checked(monkeypatch):
    policy = {"allow": ["roots", "s3://models/"], "tenant_default": [],
              "private_networks": ["10.0.0.0/8"]}  # fmt: skip
    monkeypatch.setenv("LORASWAP_ADAPTER_SOURCES", json.dumps(policy))
    settings = Settings()
    assert settings.adapter_sources.allow == ["roots", "s3://models/"]
    assert [str(n) for n in settings.adapter_sources.networks()] == ["10.0.0.0/8"]
    for bad in ({"allow": ["simplecache::s3://x/"]}, {"private_networks": ["not-a-net"]},
                {"alow": ["roots"]}):  # fmt: skip
        monkeypatch.setenv("LORASWAP_ADAPTER_SOURCES", json.dumps(bad))
        with pytest.raises(ValidationError):
            Settings()


def test_a_tenant_sources_are_checked_when_set():
    assert Tenant(name="acme").sources is None
    mine = ["roots", "s3://b/acme/"]
    assert Tenant(name="acme", sources=mine).sources == mine
    for bad in (["local::s3://b/"], ["https://"], ["s3://b/../c"]):
        with pytest.raises(ValidationError):
            Tenant(name="acme", sources=bad)


def test_materialize_reads_nothing_outside_the_policy(tmp_path):
    """Below the routes too: whatever asks, a source outside the policy is not read."""
    for source in (f"local://{SHIPPED}/uppercase", f"simplecache::file://{SHIPPED}/uppercase",
                   "memory://x"):  # fmt: skip
        with pytest.raises(AdapterInvalid, match="LORASWAP_ADAPTER_SOURCES"):
            materialize(source, name="x", version="v1", roots=ROOTS, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    got = materialize(f"{SHIPPED}/json", name="x", version="v1", roots=ROOTS, cache_dir=tmp_path)
    assert got.path == SHIPPED / "json"
    with pytest.raises(AdapterInvalid, match="LORASWAP_ADAPTER_SOURCES"):
        materialize(f"{SHIPPED}/json", name="x", version="v1", roots=ROOTS, cache_dir=tmp_path,
                    policy=SourcePolicy(allow=["s3://"]))  # fmt: skip

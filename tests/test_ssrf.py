"""http(s) adapter sources against real listeners: a source never makes the server connect to
its own networks, in any spelling of the address, after a redirect, or after its name starts
resolving elsewhere; a tenant's redirect keeps to that tenant's own prefixes; fsspec sources
naming a host are address-checked too; and a listed host still serves adapters."""

from __future__ import annotations

import hashlib
import ipaddress
import socket

import pytest

from loraswap.adapters.http_fetch import allowed_address, is_public
from loraswap.adapters.sources import HOST_PROTOCOLS, check_host, materialize
from loraswap.adapters.validation import AdapterInvalid
from loraswap.source_policy import Caller, SourcePolicy
from tests.adapter_factory import write_adapter
from tests.listeners import http_server, victim

# Every spelling of "this machine" a tenant might try; each resolves to a loopback address.
LOOPBACK_ALIASES = [
    "127.0.0.1", "localhost", "127.1", "127.0.1", "0.0.0.0", "0", "2130706433", "0x7f.0.0.1",
    "0177.0.0.1", "0x7f000001", "017700000001", "127.000.000.001", "[::1]", "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:127.0.0.1]", "[::]",
]  # fmt: skip


def fetch(source: str, policy: SourcePolicy, tmp_path, name: str = "x", caller=None):
    return materialize(source, name=name, version="v1", roots=[], cache_dir=tmp_path / "cache",
                       policy=policy, caller=caller)  # fmt: skip


def resolvable(host: str) -> bool:
    try:
        socket.getaddrinfo(host.strip("[]"), 80, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return True


def test_unlisted_hosts_are_never_contacted(tmp_path):
    """The default policy lists no http(s) host: refused before any lookup or connection."""
    with victim() as target:
        for host in LOOPBACK_ALIASES:
            for scheme in ("http", "https"):
                with pytest.raises(AdapterInvalid, match="LORASWAP_ADAPTER_SOURCES"):
                    fetch(f"{scheme}://{host}:{target.port}/x", SourcePolicy(), tmp_path)
        assert target.connections == []


@pytest.mark.parametrize("host", LOOPBACK_ALIASES)
def test_a_listed_host_that_is_this_machine_is_still_not_contacted(tmp_path, host):
    """An operator listing such a host (by mistake) still does not open the server's own
    network: the address check after resolution refuses what is not public."""
    if not resolvable(host):
        pytest.skip(f"{host} does not resolve here")
    with victim() as target:
        url = f"http://{host}:{target.port}/x"
        policy = SourcePolicy(allow=[f"http://{host}:{target.port}/"])
        with pytest.raises(AdapterInvalid, match="not a public address"):
            fetch(url, policy, tmp_path)
        assert target.connections == []
        # the same listener, its network listed by the operator: now it is reached (so the
        # zero above is the check's doing, not an unreachable listener)
        listed = policy.model_copy(
            update={"private_networks": ["127.0.0.0/8", "::1/128", "0.0.0.0/32", "::/128"]}
        )
        with pytest.raises(AdapterInvalid):  # it answers nothing HTTP
            fetch(url, listed, tmp_path)
        assert target.connections


@pytest.fixture
def adapter_dir(tmp_path, base_shapes):
    return write_adapter(tmp_path / "site" / "adapters" / "ok", base_shapes, seed=7).parent.parent


def test_a_listed_private_host_serves_an_adapter(tmp_path, adapter_dir):
    with http_server(adapter_dir) as (base, seen):
        policy = SourcePolicy(allow=[f"{base}/adapters/"], private_networks=["127.0.0.2/32"])
        got = fetch(f"{base}/adapters/ok", policy, tmp_path)
        assert (got.path / "adapter_model.safetensors").is_file() and got.kind == "http"
        assert "/adapters/ok/adapter_config.json" in seen
        with pytest.raises(AdapterInvalid, match="no adapter_config"):
            fetch(f"{base}/adapters/none", policy, tmp_path, name="none")


def test_a_redirect_to_this_machine_is_not_followed(tmp_path, adapter_dir):
    """An allowed host answers with redirects to the server's own network: to an unlisted
    host, to a listed one that resolves to loopback, to another scheme; none is contacted.
    A redirect within the allowed host is followed (the same loop works)."""
    redirects: dict[str, str] = {}
    with victim() as target, http_server(adapter_dir, redirects=redirects) as (base, seen):
        private = f"http://127.0.0.1:{target.port}/latest/meta-data"
        redirects.update({
            "/a/adapter_config.json": private,
            "/b/adapter_config.json": f"http://localhost:{target.port}/x",
            "/c/adapter_config.json": f"http://[::1]:{target.port}/x",
            "/d/adapter_config.json": f"http://2130706433:{target.port}/x",
            "/e/adapter_config.json": f"ftp://127.0.0.1:{target.port}/x",
            "/f/adapter_config.json": f"{base}/g/adapter_config.json",
            "/g/adapter_config.json": private,
            "/moved/adapter_config.json": "/adapters/ok/adapter_config.json",
            "/moved/adapter_model.safetensors": "/adapters/ok/adapter_model.safetensors",
        })  # fmt: skip
        policy = SourcePolicy(
            allow=[f"{base}/", f"http://localhost:{target.port}/",
                   f"http://[::1]:{target.port}/", f"http://2130706433:{target.port}/"],
            private_networks=["127.0.0.2/32"],
        )  # fmt: skip
        for path in "abcdef":
            with pytest.raises(AdapterInvalid):
                fetch(f"{base}/{path}", policy, tmp_path, name=path)
            assert f"/{path}/adapter_config.json" in seen, "the allowed host was asked"
        assert target.connections == []
        got = fetch(f"{base}/moved", policy, tmp_path, name="moved")
        assert (got.path / "adapter_model.safetensors").is_file()


def test_the_connection_goes_to_the_address_that_was_checked(tmp_path, adapter_dir, monkeypatch):
    """DNS rebinding: a name that resolves to an allowed address when first checked and to the
    listener on loopback afterwards. The request goes to the checked address (a client that
    looked the name up again would land on the listener); the next lookup is checked anew."""
    real = socket.getaddrinfo
    lookups: list[str] = []
    with victim() as target, http_server(adapter_dir) as (base, seen):
        port = int(base.rsplit(":", 1)[1])

        def rebinding(host, *args, **kwargs):
            if host != "adapters.rebind.test":
                return real(host, *args, **kwargs)
            lookups.append(host)
            answer = ("127.0.0.2", port) if len(lookups) == 1 else ("127.0.0.1", target.port)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", answer)]

        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        policy = SourcePolicy(allow=[f"http://adapters.rebind.test:{port}/"],
                              private_networks=["127.0.0.2/32"])  # fmt: skip
        with pytest.raises(AdapterInvalid, match="not a public address"):
            fetch(f"http://adapters.rebind.test:{port}/adapters/ok", policy, tmp_path)
        assert seen == ["/adapters/ok/adapter_config.json"], "the first file, where checked"
        assert len(lookups) == 2, "one lookup per request, each by the check"
        assert target.connections == []


def test_a_tenant_redirect_keeps_to_that_tenant_own_prefixes(tmp_path, base_shapes):
    """Issue 27: acme's allowed host answers with redirects to an `admin_extra` host, to beta's
    path on the same (allowed) host, by several spellings, and to a private address the
    operator listed. acme's fetch follows none (each hop is checked as acme's source was, path
    included) but follows one within its prefix; a global admin's fetch of the same redirect to
    `admin_extra` does reach the listener, so it is reachable and the zero is the check's."""
    site = tmp_path / "site"
    write_adapter(site / "acme" / "ok", base_shapes, seed=7)
    write_adapter(site / "beta" / "secret", base_shapes, seed=8)
    redirects: dict[str, str] = {}
    with victim() as target, http_server(site, redirects=redirects) as (base, seen):
        ops = f"http://127.0.0.1:{target.port}/"
        redirects.update({
            "/acme/a/adapter_config.json": f"{ops}ops-only/adapter_config.json",
            "/acme/b/adapter_config.json": f"{base}/beta/secret/adapter_config.json",
            "/acme/c/adapter_config.json": "/beta/secret/adapter_config.json",
            "/acme/d/adapter_config.json": f"{base}/acme/../beta/secret/adapter_config.json",
            "/acme/e/adapter_config.json": f"{base}/acme/%2e%2e/beta/secret/adapter_config.json",
            "/acme/f/adapter_config.json": f"http://localhost:{target.port}/latest/meta-data",
            "/acme/moved/adapter_config.json": "/acme/ok/adapter_config.json",
            "/acme/moved/adapter_model.safetensors": "/acme/ok/adapter_model.safetensors",
        })  # fmt: skip
        policy = SourcePolicy(allow=["roots", f"{base}/acme/", f"{base}/beta/"], admin_extra=[ops],
                              private_networks=["127.0.0.0/8", "::1/128"])  # fmt: skip
        acme = Caller(tenant="acme", sources=(f"{base}/acme/",))
        for path in "abcdef":
            with pytest.raises(AdapterInvalid, match=r"redirected to .*LORASWAP_ADAPTER_SOURCES"):
                fetch(f"{base}/acme/{path}", policy, tmp_path, name=path, caller=acme)
            assert f"/acme/{path}/adapter_config.json" in seen, "the allowed host was asked"
        assert target.connections == []
        assert not [p for p in seen if not p.startswith("/acme/")], seen
        got = fetch(f"{base}/acme/moved", policy, tmp_path, name="moved", caller=acme)
        assert (got.path / "adapter_model.safetensors").is_file()
        with pytest.raises(AdapterInvalid, match="cannot fetch"):  # it answers nothing HTTP
            fetch(f"{base}/acme/a", policy, tmp_path, name="admin", caller=Caller())
        assert target.connections


@pytest.mark.parametrize(
    ("address", "public"),
    [("fec0::1", False), ("192.88.99.1", False), ("3fff::1", False), ("2001:db8::1", False),
     ("100:0:0:1::1", False), ("5f00::1", False), ("198.18.0.1", False), ("192.0.0.9", False),
     ("100.64.0.1", False), ("0.1.2.3", False), ("255.255.255.255", False), ("::", False),
     ("::ffff:10.0.0.1", False), ("2002:a00:1::1", False), ("64:ff9b::a00:1", False),
     ("fd00::1", False), ("fe80::1", False), ("ff02::1", False),
     ("8.8.8.8", True), ("1.1.1.1", True), ("2606:4700:4700::1111", True)],
)  # fmt: skip
def test_addresses_that_are_not_public(address, public):
    """``is_global`` misses some ranges on some Python releases (3.11: site-local fec0::/10,
    6to4 relay anycast 192.88.99.0/24, documentation 3fff::/20); the explicit list does not.
    The operator may still list any of them in ``private_networks``."""
    parsed = ipaddress.ip_address(address)
    assert is_public(parsed) is public
    assert allowed_address(parsed, [ipaddress.ip_network(address)])


def test_a_listed_host_resolving_to_site_local_or_relay_anycast_is_refused(tmp_path, monkeypatch):
    real = socket.getaddrinfo
    answers = {"site-local.test": (socket.AF_INET6, "fec0::1"),
               "relay.test": (socket.AF_INET, "192.88.99.1")}  # fmt: skip

    def resolve(host, *args, **kwargs):
        if host not in answers:
            return real(host, *args, **kwargs)
        family, address = answers[host]
        return [(family, socket.SOCK_STREAM, 6, "", (address, 80))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    for host in answers:
        policy = SourcePolicy(allow=[f"http://{host}/"])
        with pytest.raises(AdapterInvalid, match="not a public address"):
            fetch(f"http://{host}/x", policy, tmp_path)


def test_fsspec_sources_naming_a_host_are_address_checked(tmp_path):
    """sftp, ftp, smb, webhdfs... (listed by an operator) resolve their host first: loopback in
    any spelling is refused before any connection, unless `private_networks` lists it; then
    fsspec's FTP client does reach the listener (the zero is the check's doing)."""
    with victim() as target:
        for protocol in sorted(HOST_PROTOCOLS):
            for host in [h for h in LOOPBACK_ALIASES if not h.startswith("[")]:  # `[`: a glob
                source = f"{protocol}://{host}:{target.port}/adapters/x"
                why = "not a public address" if resolvable(host) else "cannot resolve"
                with pytest.raises(AdapterInvalid, match=why):
                    fetch(source, SourcePolicy(allow=[f"{protocol}://"]), tmp_path)
        assert target.connections == []
        listed = SourcePolicy(allow=["ftp://"], private_networks=["127.0.0.0/8"])
        with pytest.raises(AdapterInvalid, match="cannot fetch"):
            fetch(f"ftp://127.0.0.1:{target.port}/adapters/x", listed, tmp_path)
        assert target.connections
    check_host("s3://127.0.0.1/x", SourcePolicy())  # a bucket name: the operator's endpoint


def test_the_cache_is_per_source(tmp_path, base_shapes):
    """The same name and version from another source (after a delete, by a new owner) is
    fetched, never served from the earlier source's cached copy."""
    site = tmp_path / "site"
    write_adapter(site / "old" / "x", base_shapes, seed=1)
    write_adapter(site / "new" / "x", base_shapes, seed=2)
    with http_server(site) as (base, seen):
        policy = SourcePolicy(allow=[f"{base}/"], private_networks=["127.0.0.2/32"])
        first = fetch(f"{base}/old/x", policy, tmp_path)
        assert fetch(f"{base}/old/x", policy, tmp_path).path == first.path  # a cache hit
        assert seen.count("/old/x/adapter_config.json") == 1
        second = fetch(f"{base}/new/x", policy, tmp_path)
    assert second.path != first.path and "/new/x/adapter_config.json" in seen
    weights = "adapter_model.safetensors"
    digest = {p: hashlib.sha256((p / weights).read_bytes()).digest() for p in (first.path,
              second.path, site / "new" / "x")}  # fmt: skip
    assert digest[second.path] == digest[site / "new" / "x"] != digest[first.path]

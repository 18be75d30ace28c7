"""http(s) adapter sources against real listeners: a source never makes the server connect to
its own networks, in any spelling of the address, after a redirect, or after its name starts
resolving elsewhere; and a listed host still serves adapters."""

from __future__ import annotations

import socket

import pytest

from loraswap.adapters.sources import materialize
from loraswap.adapters.validation import AdapterInvalid
from loraswap.source_policy import SourcePolicy
from tests.adapter_factory import write_adapter
from tests.listeners import http_server, victim

# Every spelling of "this machine" a tenant might try; each resolves to a loopback address.
LOOPBACK_ALIASES = [
    "127.0.0.1", "localhost", "127.1", "127.0.1", "0.0.0.0", "0", "2130706433", "0x7f.0.0.1",
    "0177.0.0.1", "0x7f000001", "017700000001", "127.000.000.001", "[::1]", "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:127.0.0.1]", "[::]",
]  # fmt: skip


def fetch(source: str, policy: SourcePolicy, tmp_path, name: str = "x"):
    return materialize(source, name=name, version="v1", roots=[], cache_dir=tmp_path / "cache",
                       policy=policy)  # fmt: skip


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

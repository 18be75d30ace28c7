"""Adapter files over http(s), without letting a source aim the server at its own network.

Every hop (the source URL and each redirect) must pass the source policy's check for the same
caller as the source (``allowed``: a tenant's own prefixes, path included), its host is resolved
here and every address it resolves to must be public (or in the operator's
``private_networks``), and the connection goes to the address that was checked, so a name that
resolves differently a moment later (DNS rebinding) cannot move it. Redirects are followed by
this loop, never by the client; proxies from the environment are not used (they would resolve
the name themselves).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

from ..source_policy import DEFAULT_PORTS, Network
from .validation import AdapterInvalid

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
REDIRECTS = frozenset({301, 302, 303, 307, 308})
NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
# IANA's special-purpose ranges that are not globally reachable (and deprecated ones), listed
# because ``is_global`` depends on the Python release and misses some (3.11: fec0::/10 site-local,
# 192.88.99.0/24 6to4 relay anycast, 3fff::/20 documentation). Some anycast blocks IANA marks
# reachable (192.0.0.9/32, parts of 2001::/23) go with their block: adapters are not served there.
NOT_PUBLIC = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/127", "::ffff:0:0/96", "64:ff9b:1::/48", "100::/63", "2001::/23", "2001:db8::/32",
    "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))  # fmt: skip


def embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, compatible, NAT64, 6to4, Teredo)."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if int(address) >> 32 == 0 or any(address in net for net in NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    return address.teredo[1] if address.teredo is not None else None


def is_public(address: Address) -> bool:
    """Reachable on the internet: not loopback, private, link-local, site-local, shared,
    documentation, benchmarking, relay anycast, reserved, multicast or unspecified (Python's
    ``is_global`` and :data:`NOT_PUBLIC` both), nor an IPv6 spelling of such an IPv4 address."""
    inner = embedded_ipv4(address)
    if inner is not None and not is_public(inner):
        return False
    if any(address in net for net in NOT_PUBLIC if net.version == address.version):
        return False
    return address.is_global and not (
        address.is_multicast or address.is_reserved or address.is_unspecified
    )


def allowed_address(address: Address, networks: list[Network]) -> bool:
    inner = embedded_ipv4(address)
    listed = any(address in net or (inner is not None and inner in net) for net in networks)
    return listed or is_public(address)


def checked_address(host: str, port: int, networks: list[Network]) -> str:
    """An address of ``host`` to connect to, once every address it resolves to is allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise AdapterInvalid(f"cannot resolve {host!r}: {exc}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:
        if not allowed_address(address, networks):
            raise AdapterInvalid(
                f"{host!r} resolves to {address}, which is not a public address: adapter "
                "sources may not reach this server's own networks (LORASWAP_ADAPTER_SOURCES "
                "private_networks lists the ones they may)"
            )
    if not addresses:
        raise AdapterInvalid(f"{host!r} resolves to no address")
    return str(addresses[0])


def _pinned_request(client: httpx.Client, url: str, networks: list[Network]) -> httpx.Request:
    """A GET of ``url`` sent to the checked address, with the name as Host and TLS server name
    (the certificate is verified against the name)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    address = checked_address(host, port, networks)
    literal = f"[{address}]" if ":" in address else address
    target = parts._replace(netloc=f"{literal}:{port}").geturl()
    host_header = parts.netloc.rpartition("@")[2]
    return client.build_request(
        "GET", target, headers={"host": host_header}, extensions={"sni_hostname": host}
    )


def download(
    url: str,
    target: Path,
    *,
    allowed: Callable[[str], None],
    networks: list[Network],
    required: bool = True,
    max_redirects: int = 5,
    timeout_s: float = 60.0,
) -> bool:
    """Save ``url`` to ``target``; False if it is absent and not ``required``. ``allowed``
    raises for a URL outside the policy; it sees the first URL and every redirect."""
    with httpx.Client(trust_env=False, follow_redirects=False, timeout=timeout_s) as client:
        for _ in range(max_redirects + 1):
            if urlsplit(url).scheme not in DEFAULT_PORTS:
                raise AdapterInvalid(f"redirected to {url!r}: only http(s) is followed")
            allowed(url)
            request = _pinned_request(client, url, networks)
            response = client.send(request, stream=True)
            try:
                location = response.headers.get("location")
                if response.status_code in REDIRECTS and location:
                    url = urljoin(url, location)
                    continue
                if response.status_code == 404 and not required:
                    return False
                if response.status_code != 200:
                    raise AdapterInvalid(f"HTTP {response.status_code} for {url}")
                with target.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                return True
            finally:
                response.close()
    raise AdapterInvalid(f"more than {max_redirects} redirects from {url}")

"""Where adapters may come from: ``LORASWAP_ADAPTER_SOURCES`` and each tenant's ``sources``.

A source and every listed prefix are parsed into the same segments (kind, then host or bucket or
organisation, then path) and a source is allowed when a prefix's segments begin its own. Matching
parsed segments, not strings, is what keeps ``local:///x``, ``simplecache::file:///x``,
``http://allowed@127.0.0.1/`` or ``s3://b/acme/../beta`` from passing for something listed: fsspec
protocols are accepted by name only, chains (``::``) never, userinfo, ``..``, escapes and
control or other unprintable characters never. A leaf module (stdlib and pydantic): the
settings, the tenants and the adapters all read it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

ROOTS = "roots"  # any directory inside an adapter root
ANY = "*"  # anything that parses (still one protocol, still address-checked)
POLICY_NAME = "the adapter source policy (LORASWAP_ADAPTER_SOURCES)"
SCHEME = re.compile(r"^[a-z][a-z0-9_+.-]*$")  # fsspec names: arrow_hdfs, s3a...
UNSAFE = re.compile(r"[\s?#%\\\x00-\x1f\x7f]")
GLOB = re.compile(r"[*\[\]{}]")  # fsspec expands these in paths; a prefix's trailing `*` is ours
HF_PART = re.compile(r"^[A-Za-z0-9][\w.-]*$")
HF_REVISION = re.compile(r"^[\w./-]+$")
BENTO_PART = re.compile(r"^[A-Za-z0-9][\w.-]*$")
DEFAULT_PORTS = {"http": 80, "https": 443}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SourceRefused(ValueError):
    """The source is outside the policy (or unreadable as a source); the message says why."""


@dataclass(frozen=True)
class Caller:
    """Whose limits a source is held to: tenant ``tenant``'s (its own ``sources``; None: the
    policy's ``tenant_default``), else a global admin's (``admin``) or another key's. One value
    for the registration route, the fetch and each redirect, so all three ask the same."""

    admin: bool = True
    tenant: str | None = None
    sources: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Spelled:
    """A source or prefix as segments: ``kind`` (``file`` for a local path, ``hf``, ``bentoml``,
    ``http``, ``https`` or another fsspec protocol) and the parts a prefix must begin."""

    kind: str
    parts: tuple[str, ...]

    def begins(self, source: Spelled) -> bool:
        """This prefix covers ``source``; a last part ending in ``*`` matches by string prefix."""
        if self.kind != source.kind or len(self.parts) > len(source.parts):
            return False
        for index, part in enumerate(self.parts):
            theirs = source.parts[index]
            last = index == len(self.parts) - 1
            if last and part.endswith("*"):
                return theirs.startswith(part[:-1])
            if part != theirs:
                return False
        return True


def _segments(path: str, what: str) -> tuple[str, ...]:
    """``a/b/`` as ``(a, b)``: one trailing slash is the same directory, any other empty
    segment (``a//b``) is refused, as ``.`` and ``..`` are, and path parameters (``;``: some
    servers read ``acme/..;/beta`` as ``beta``)."""
    path = path.removesuffix("/")
    parts = path.split("/") if path else []
    if any(p in ("", ".", "..") for p in parts):
        raise SourceRefused(f"{what}: empty, `.` and `..` path segments are not accepted")
    if ";" in path:
        raise SourceRefused(f"{what}: `;` (path parameters) is not accepted")
    return tuple(parts)


def _local(text: str) -> Spelled:
    path = text[len("file://") :] if text.startswith("file://") else text
    if not path:
        raise SourceRefused("an empty path is not a source")
    try:
        return Spelled("file", Path(path).expanduser().resolve().parts)
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, `~nobody`...
        raise SourceRefused(f"{text!r} is not a readable path: {exc}") from None


def _http(text: str, scheme: str, prefix: bool) -> Spelled:
    parts = urlsplit(text)
    if "@" in parts.netloc:
        raise SourceRefused(f"{text!r}: user information in a URL is not accepted")
    host = parts.hostname or ""
    if not host:
        if prefix:
            raise SourceRefused(f"{text!r}: http(s) entries name a host (`https://host/`)")
        raise SourceRefused(f"{text!r} names no host")
    if not host.isascii():
        raise SourceRefused(f"{text!r}: write the host in ASCII (IDNA, `xn--...`)")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise SourceRefused(f"{text!r}: bad port") from None
    if "::" in parts.path:
        raise SourceRefused(f"{text!r}: chained URLs (`::`) are not accepted")
    host = f"[{host}]" if ":" in host else host
    return Spelled(scheme, (f"{host}:{port}", *_segments(parts.path.removeprefix("/"), text)))


def _hub(rest: str, text: str, prefix: bool) -> Spelled:
    repo, _, revision = rest.partition("@")
    parts = _segments(repo, text)
    if revision and (prefix or not HF_REVISION.match(revision) or ".." in revision.split("/")):
        raise SourceRefused(f"{text!r}: bad revision (hf://org/name@revision)")
    names = [p.removesuffix("*") if prefix else p for p in parts]
    if (
        len(parts) > 2
        or not all(HF_PART.match(n) for n in names)
        or (not prefix and len(parts) != 2)
    ):
        raise SourceRefused(f"bad hub source {text!r}: use hf://org/name[@revision]")
    return Spelled("hf", tuple(p.lower() for p in parts))


def _bento(rest: str, text: str, prefix: bool) -> Spelled:
    if not rest:
        if prefix:
            return Spelled("bentoml", ())
        raise SourceRefused(f"bad BentoML source {text!r}: use bentoml://name[:version]")
    parts = rest.split(":")
    if len(parts) > 2 or not all(BENTO_PART.match(p.removesuffix("*") or "x") for p in parts):
        raise SourceRefused(f"bad BentoML source {text!r}: use bentoml://name[:version]")
    return Spelled("bentoml", (parts[0].lower(), *parts[1:]))


def spell(text: str, prefix: bool = False) -> Spelled:
    """``text`` (a source, or a policy or tenant prefix) as segments; SourceRefused if it is not
    one source of one protocol."""
    if not isinstance(text, str) or not text.strip() or text != text.strip():
        raise SourceRefused(f"{text!r} is not a source")
    if not text.isprintable():  # NUL (Path would raise), newlines, bidi overrides, surrogates
        raise SourceRefused(f"{text!r}: control and other unprintable characters are not accepted")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme == "file":
        if "::" in text:
            raise SourceRefused(f"{text!r}: chained URLs (`::`) are not accepted")
        return _local(text)
    if scheme in DEFAULT_PORTS:
        if UNSAFE.search(text):
            raise SourceRefused(f"{text!r}: spaces, `?`, `#`, `%` and `\\` are not accepted")
        return _http(text, scheme, prefix)
    if "::" in text:
        raise SourceRefused(f"{text!r}: chained URLs (`::`) are not accepted")
    if not SCHEME.match(scheme):
        raise SourceRefused(f"{text!r}: protocol {scheme!r} is not a protocol name")
    if UNSAFE.search(rest):
        raise SourceRefused(f"{text!r}: spaces, `?`, `#`, `%` and `\\` are not accepted")
    if GLOB.search(rest.removesuffix("*") if prefix else rest):
        raise SourceRefused(f"{text!r}: glob characters (`*`, `[`, `{{`) are not accepted")
    if scheme == "hf":
        return _hub(rest, text, prefix)
    if scheme == "bentoml":
        return _bento(rest, text, prefix)
    authority, _, path = rest.partition("/")
    if "@" in authority:
        raise SourceRefused(f"{text!r}: user information in a URL is not accepted")
    if not authority and not path:
        if not prefix:
            raise SourceRefused(f"{text!r} names no bucket, host or path")
        return Spelled(scheme, ())
    return Spelled(scheme, (authority, *_segments(path, text)))


def check_entry(entry: str) -> str:
    """A policy or tenant entry: ``roots``, ``*``, or a prefix :func:`spell` reads."""
    if entry not in (ROOTS, ANY):
        spell(entry, prefix=True)
    return entry


def inside(path: tuple[str, ...], roots: list[Path]) -> bool:
    """``path`` (resolved parts) is an adapter root or below one."""
    return any(Spelled("file", root.expanduser().resolve().parts).begins(Spelled("file", path))
               for root in roots)  # fmt: skip


class SourcePolicy(BaseModel):
    """Which sources registration accepts: ``allow`` for every key, a tenant's own ``sources``
    (else ``tenant_default``) on top of it, ``admin_extra`` for global admin keys only."""

    model_config = ConfigDict(extra="forbid")

    allow: list[str] = Field(
        default_factory=lambda: [ROOTS, "hf://", "s3://", "bentoml://"],
        description="prefixes any key may register from (tenants: within their own too)",
    )
    tenant_default: list[str] = Field(
        default_factory=lambda: [ROOTS],
        description="what a tenant without its own `sources` may register from",
    )
    admin_extra: list[str] = Field(
        default_factory=list,
        description="more prefixes for global admin keys (and a server without keys); `*`: any",
    )
    private_networks: list[str] = Field(
        default_factory=list,
        description="addresses (CIDR) http(s) sources, and fsspec ones naming a host (`sftp://`, "
        "`ftp://`...), may reach though loopback, private, link-local or otherwise not public",
    )

    @field_validator("allow", "tenant_default", "admin_extra")
    @classmethod
    def _entries(cls, value: list[str]) -> list[str]:
        try:
            return [check_entry(entry) for entry in value]
        except SourceRefused as exc:
            raise ValueError(str(exc)) from None

    @field_validator("private_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)  # ValueError names the bad one
        return value

    def networks(self) -> list[Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.private_networks]

    def deployment(self) -> list[str]:
        """A global admin's entries (a server without keys' too): the widest any key gets."""
        return [*self.allow, *self.admin_extra]

    def check(
        self,
        source: str,
        roots: list[Path],
        *,
        admin: bool = True,
        tenant: str | None = None,
        tenant_sources: list[str] | None = None,
    ) -> None:
        """Raise SourceRefused unless ``source`` is within the policy for this key: a global
        admin's (``admin``, no ``tenant``), any other key's, or tenant ``tenant``'s."""
        entries = self.deployment() if admin and tenant is None else self.allow
        shown = self.allow if tenant is not None else entries
        try:
            spelled = spell(source)
        except SourceRefused as exc:
            raise SourceRefused(f"{exc} ({POLICY_NAME})") from None
        why = refusal(spelled, entries, roots)
        if why is None and tenant is not None:
            shown = self.tenant_default if tenant_sources is None else tenant_sources
            why = refusal(spelled, shown, roots)
        if why is not None:
            who = f"tenant {tenant!r}" if tenant is not None else "this key"
            listed = ", ".join(shown) or "nothing"
            raise SourceRefused(f"source {source!r} is not allowed by {POLICY_NAME}: {why}; "
                                f"{who} may register from: {listed}")  # fmt: skip

    def check_as(self, source: str, roots: list[Path], caller: Caller) -> None:
        """:meth:`check` for ``caller``."""
        sources = None if caller.sources is None else list(caller.sources)
        self.check(source, roots, admin=caller.admin, tenant=caller.tenant, tenant_sources=sources)

    def check_hop(self, url: str, roots: list[Path], caller: Caller) -> None:
        """A redirect's target passes what its source passed, for the same caller (a tenant's
        own prefixes, path included; ``admin_extra`` for a global admin's only); its query and
        fragment are the listed host's business (a signed URL's signature) and not checked."""
        self.check_as(urlsplit(url)._replace(query="", fragment="").geturl(), roots, caller)


def refusal(source: Spelled, entries: list[str], roots: list[Path]) -> str | None:
    """Why none of ``entries`` covers ``source`` (None: one does)."""
    for entry in entries:
        if entry == ANY:
            return None
        if entry == ROOTS:
            if source.kind == "file" and inside(source.parts, roots):
                return None
            continue
        if spell(entry, prefix=True).begins(source):
            return None
    kinds = {"file" if e == ROOTS else spell(e, prefix=True).kind for e in entries if e != ANY}
    if source.kind == "file":
        if ROOTS in entries and not inside(source.parts, roots):
            return "it is outside the adapter roots"
        return "it is under none of the listed directories"
    if source.kind not in kinds:
        return f"protocol {source.kind!r} is not accepted"
    return "it is under none of the listed prefixes"

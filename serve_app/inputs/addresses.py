"""Which URLs the service may reach for a user: the address policy of the URL fetcher.

The threat is SSRF: a URL naming (or resolving to, or redirecting to) a loopback, private,
link-local or cloud-metadata address makes the service fetch something only it can reach.
This module decides, for one hop, before any connection:

1. Parse the URL strictly ourselves and refuse anything that other parsers might read
   differently (backslashes, whitespace, control characters, userinfo, percent-encoded or
   zoned hosts). Only http and https.
2. Resolve the host exactly once with ``loop.getaddrinfo``; that also turns the numeric
   shorthands the OS accepts (``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``)
   into the address a socket would really reach, so we judge what would be connected to.
3. Refuse if ANY resolved address is not public unicast, unless ``allow_hosts`` exempts it.
   Cloud metadata addresses and names are refused even when allowlisted.

A refusal names the rule (a loopback address, a private address, ...), never the address a
name resolved to: the answer must not map internal DNS for the caller.

The result, an ``Endpoint``, is where the HTTP client (``serve_app.inputs.fetch``) connects:
the checked IPs themselves, so nothing resolves the name again.

URLs with userinfo (``http://user:pw@host/``) are refused: nobody needs to send credentials
to an image URL through us, and ``@`` is the classic parser-confusion trick.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from serve_app.errors import ServiceError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_URL_CHARS = 8192

# Characters on which URL parsers disagree (WHATWG reads "\" as "/", strips tabs/newlines,
# ...) or that have no business in a URL we accept.
_AMBIGUOUS_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_NETLOC_IPV6 = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?")
_NETLOC_NAME = re.compile(r"([^:\[\]]+)(?::(\d{1,5}))?")
_HOST_NAME = re.compile(
    r"(?=.{1,253}\.?$)([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
    r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.?"
)

_METADATA_NAMES = frozenset(
    {
        "metadata.google.internal",
        "metadata.goog",
        "metadata",  # found through the resolv.conf search domain on GCE
        "instance-data",  # AWS
        "instance-data.ec2.internal",
    }
)
_METADATA_IPS = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean
        "169.254.169.253",  # AWS DNS resolver
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
    )
)

_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_PRIVATE_V4 = tuple(
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
_BROADCAST_V4 = ipaddress.IPv4Address("255.255.255.255")
_UNIQUE_LOCAL_V6 = ipaddress.IPv6Network("fc00::/7")
# Well-known NAT64 prefix: an IPv6-only cluster reaches IPv4 hosts through it, so judge the
# embedded address instead of refusing the prefix (it sits inside the reserved ::/8).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


async def check_url(
    url: str, *, allow_hosts: Sequence[str] = (), resolve_timeout_s: float = 5.0
) -> Endpoint:
    """Refuse ``url`` now if fetching or posting to it would be refused; connect to nothing.

    For URLs used later (callbacks), so that a bad one is a 400 before any work is accepted.
    The answer holds for the addresses the name has now; the later request resolves and
    checks again, so a name re-pointed at a private address meanwhile is still refused.

    Raises ``ServiceError``: 400 bad_url / fetch_refused, 422 fetch_failed / fetch_timeout.
    """
    return await resolve_and_check(
        parse_url(url), compile_allow_hosts(tuple(allow_hosts)), resolve_timeout_s
    )


@dataclass(frozen=True)
class AllowList:
    names: frozenset[str]
    networks: tuple[IPNetwork, ...]

    def allows_name(self, name: str) -> bool:
        return name in self.names

    def allows_ip(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.networks)


@functools.lru_cache(maxsize=16)
def compile_allow_hosts(entries: tuple[str, ...]) -> AllowList:
    """Parse allowlist entries ("localhost", "127.0.0.1", "[::1]", "10.0.0.0/8").

    Exposed so that config loading can reject a bad entry at startup.
    """
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for raw in entries:
        entry = raw.strip().lower()
        if entry.startswith("[") and "]" in entry:
            entry = entry[1:].replace("]", "", 1)
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        name = _idna(entry.rstrip("."))
        if name is None or not _HOST_NAME.fullmatch(name):
            raise ValueError(f"invalid allow_hosts entry {raw!r}: not a host name, IP or CIDR")
        names.add(name)
    return AllowList(frozenset(names), tuple(networks))


def address_problem(ip: IPAddress, reveal: bool = True) -> str | None:
    """Why ``ip`` must not be fetched from ("a loopback address", ...); None if public.

    ``reveal=False`` leaves out the IPv4 address a 6to4 or NAT64 address embeds: for an
    address a name resolved to, which the caller must not learn.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return address_problem(ip.ipv4_mapped, reveal)
    if ip in _METADATA_IPS:
        return "a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.sixtofour is not None:
            inner = address_problem(ip.sixtofour, reveal)
            if inner:
                return f"a 6to4 address embedding {_embedded(ip.sixtofour, inner, reveal)}"
        if ip.teredo is not None:
            return "a Teredo tunnel address"
        if ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            inner = address_problem(embedded, reveal)
            if inner:
                return f"a NAT64 address embedding {_embedded(embedded, inner, reveal)}"
            return None
    # Order matters only for the message: the most specific description wins.
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip == _BROADCAST_V4:
        return "a broadcast address"
    if isinstance(ip, ipaddress.IPv4Address):
        if ip in _CGNAT:
            return "a shared (CGNAT) address"
        if any(ip in net for net in _PRIVATE_V4):
            return "a private address"
    else:
        if ip in _UNIQUE_LOCAL_V6:
            return "a unique-local (private) address"
        if ip.is_site_local:
            return "a site-local address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private or not ip.is_global:
        return "a non-public special-purpose address"
    return None


def _embedded(ip: IPAddress, problem: str, reveal: bool) -> str:
    return f"{ip}, {problem}" if reveal else problem


@dataclass(frozen=True)
class Endpoint:
    """Where one hop really goes, decided once: connect only to ``addresses``."""

    addresses: list[IPAddress]
    server_name: str  # for SNI/certificate checks: host name, or the canonical IP
    authority: str  # Host header value


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # lowercase ASCII as written (IDNA-encoded), IPv6 without brackets
    port: int
    path: str
    query: str

    @property
    def name(self) -> str:
        """The host as a DNS name for comparisons: no trailing dot."""
        return self.host.rstrip(".")


def parse_url(url: str) -> Target:
    if not isinstance(url, str) or not url:
        raise ServiceError(400, "bad_url", "empty URL")
    if len(url) > _MAX_URL_CHARS:
        raise ServiceError(400, "bad_url", f"URL longer than {_MAX_URL_CHARS} characters")
    if _AMBIGUOUS_CHARS.search(url):
        raise ServiceError(
            400, "bad_url", "URL contains whitespace, control characters or backslashes"
        )
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ServiceError(400, "bad_url", f"unparseable URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ServiceError(
            400, "bad_url", f"unsupported URL scheme {scheme or '(none)'!r}: use http or https"
        )
    netloc = parts.netloc
    if not netloc:
        raise ServiceError(400, "bad_url", "URL has no host")
    if "@" in netloc:
        raise ServiceError(400, "bad_url", "URLs with credentials (user@host) are not accepted")
    if "%" in netloc:
        raise ServiceError(400, "bad_url", "percent-encoded or zoned hosts are not accepted")

    if netloc.startswith("["):
        m = _NETLOC_IPV6.fullmatch(netloc)
        try:
            host = str(ipaddress.IPv6Address(m.group(1))) if m else ""
        except ValueError:
            host = ""
    else:
        m = _NETLOC_NAME.fullmatch(netloc)
        host = (_idna(m.group(1).lower()) or "") if m else ""
        if host and not _HOST_NAME.fullmatch(host):
            host = ""
    if not m or not host:
        raise ServiceError(400, "bad_url", f"invalid host in URL: {show(netloc)}")
    port = int(m.group(2)) if m.group(2) else DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise ServiceError(400, "bad_url", f"invalid port {port}")
    return Target(scheme, host, port, parts.path or "/", parts.query)


def _idna(host: str) -> str | None:
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return None


async def resolve_and_check(target: Target, allow: AllowList, resolve_timeout_s: float) -> Endpoint:
    """Resolve once and refuse unless every address is acceptable.

    Host header and SNI carry the name as written, or for a numeric host the address it
    really denotes (``2130706433`` -> ``127.0.0.1``), which is what a server would expect.
    """
    if target.name in _METADATA_NAMES:
        raise ServiceError(400, "fetch_refused", f"refused: {target.name} is a cloud metadata name")
    loop = asyncio.get_running_loop()
    numeric = True
    try:
        # Never touches the network: succeeds only for the numeric forms libc understands.
        infos = await loop.getaddrinfo(
            target.host, target.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
        )
    except (socket.gaierror, UnicodeError):
        numeric = False
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM),
                resolve_timeout_s,
            )
        except TimeoutError:
            raise ServiceError(422, "fetch_timeout", f"timed out resolving {target.name}") from None
        except (OSError, UnicodeError) as exc:
            raise ServiceError(
                422, "fetch_failed", f"could not resolve {target.name}: {exc}"
            ) from None

    addresses: list[IPAddress] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        resolved = ipaddress.ip_address(sockaddr[0])
        # Judge (and connect to) what an IPv4-mapped address really reaches.
        if isinstance(resolved, ipaddress.IPv6Address) and resolved.ipv4_mapped is not None:
            ip: IPAddress = resolved.ipv4_mapped
        else:
            ip = resolved
        _refuse_unless_acceptable(target, numeric, resolved, ip, allow)
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise ServiceError(422, "fetch_failed", f"{target.name} has no IP addresses")

    server_name = str(addresses[0]) if numeric else target.name
    authority = f"[{server_name}]" if numeric and addresses[0].version == 6 else server_name
    if target.port != DEFAULT_PORTS[target.scheme]:
        authority = f"{authority}:{target.port}"
    return Endpoint(addresses, server_name, authority)


def _refuse_unless_acceptable(
    target: Target, numeric: bool, resolved: IPAddress, ip: IPAddress, allow: AllowList
) -> None:
    problem = address_problem(ip)
    if problem is None:
        return
    # Metadata endpoints hand out credentials: no allowlist entry (say a broad 169.254/16 or a
    # name that happens to resolve there) may open them.
    if ip not in _METADATA_IPS and (
        (not numeric and allow.allows_name(target.name)) or allow.allows_ip(ip)
    ):
        return
    if not numeric:
        # Only the rule: which address a name has is internal DNS, not the caller's business.
        rule = address_problem(ip, reveal=False)
        raise ServiceError(400, "fetch_refused", f"refused: {target.name} resolves to {rule}")
    # A numeric host: the address is the caller's own, written in some form.
    what = f"{resolved} (IPv4-mapped {ip})" if resolved != ip else str(ip)
    if target.host == str(resolved):
        subject = f"{what} is"
    else:
        subject = f"{target.host} is {what},"  # e.g. "2130706433 is 127.0.0.1,"
    raise ServiceError(400, "fetch_refused", f"refused: {subject} {problem}")


def show(text: str, limit: int = 200) -> str:
    """`text` for a message: long URLs cut short."""
    return text if len(text) <= limit else text[:limit] + "..."

"""Fetch an image from a user-supplied URL without becoming a proxy into our own network.

The threat is SSRF: a URL naming (or resolving to, or redirecting to) a loopback, private,
link-local or cloud-metadata address makes the service fetch something only it can reach.
The defence, per hop:

1. Parse the URL strictly ourselves and refuse anything that other parsers might read
   differently (backslashes, whitespace, control characters, userinfo, percent-encoded or
   zoned hosts). Only http and https.
2. Resolve the host exactly once with ``loop.getaddrinfo``; that also turns the numeric
   shorthands the OS accepts (``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``)
   into the address a socket would really reach, so we judge what would be connected to.
3. Refuse if ANY resolved address is not public unicast, unless ``allow_hosts`` exempts it.
   Cloud metadata addresses and names are refused even when allowlisted.
4. Connect to the checked IP itself: the request URL carries the IP literal, so nothing
   resolves the name again (no DNS-rebinding window). The original name goes into the Host
   header and, for https, into ``sni_hostname``, which httpcore uses as the TLS
   ``server_hostname``: SNI and certificate verification are done for the original name.
5. Redirects are not followed by httpx; each Location goes through 1-4 again.

URLs with userinfo (``http://user:pw@host/``) are refused: nobody needs to send credentials
to an image URL through us, and ``@`` is the classic parser-confusion trick.

``post_url`` sends a body (job callbacks) under the same rules 1-4, and follows no redirect
at all: replaying a POST body to wherever a 3xx points is exactly the proxying refused here.
``check_url`` runs 1-3 alone, to refuse a URL before accepting work that will use it later.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote, urljoin, urlsplit

import httpx

from serve_app.errors import ServiceError

from .imageinfo import SNIFF_PREFIX_BYTES, sniff

_T = TypeVar("_T")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_URL_CHARS = 8192
# Several A/AAAA records are normal; each one is checked, but trying them all on connection
# failure would multiply the connect timeout.
_MAX_ADDRESSES_TRIED = 3
_USER_AGENT = "visionserve-fetch/1"
_POST_USER_AGENT = "visionserve-callback/1"
# A callback receiver's answer is read only to free the connection: its content is unused.
_POST_MAX_RESPONSE_BYTES = 64 * 1024

# Characters on which URL parsers disagree (WHATWG reads "\" as "/", strips tabs/newlines,
# ...) or that have no business in a URL we accept.
# Kept unescaped when re-encoding path and query: RFC 3986 reserved + unreserved + "%".
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"

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


async def fetch_url(
    url: str,
    *,
    max_bytes: int,
    connect_timeout_s: float,
    read_timeout_s: float,
    allow_hosts: Sequence[str] = (),
    max_redirects: int = 3,
    total_timeout_s: float | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> bytes:
    """Download ``url`` and return its bytes, which are known to start like an image.

    ``allow_hosts`` lists host names, IPs and CIDRs exempt from the non-public-address
    refusal (a name entry trusts whatever that name resolves to). ``total_timeout_s`` bounds
    the whole fetch, redirects included, so a server trickling bytes just under the read
    timeout cannot hold a request forever; by default ``4 * (connect + read)``.
    ``ssl_context`` replaces the default CA bundle (private CAs, tests).

    Raises ``ServiceError``: 400 bad_url / fetch_refused, 413 too_large, 415 not_an_image,
    422 fetch_failed / fetch_timeout. A malformed ``allow_hosts`` entry is a configuration
    error and raises ``ValueError``.
    """
    allow = compile_allow_hosts(tuple(allow_hosts))
    if total_timeout_s is None:
        total_timeout_s = 4 * (connect_timeout_s + read_timeout_s)
    settings = _Settings(
        max_bytes=max_bytes,
        timeout=httpx.Timeout(
            connect=connect_timeout_s,
            read=read_timeout_s,
            write=read_timeout_s,
            pool=connect_timeout_s,
        ),
        resolve_timeout_s=connect_timeout_s,
        ssl_context=ssl_context if ssl_context is not None else _default_ssl_context(),
    )
    try:
        async with asyncio.timeout(total_timeout_s):
            return await _fetch_following_redirects(url, allow, max_redirects, settings)
    except TimeoutError:
        raise ServiceError(
            422, "fetch_timeout", f"gave up fetching {_show(url)} after {total_timeout_s:g} s"
        ) from None


async def check_url(
    url: str, *, allow_hosts: Sequence[str] = (), resolve_timeout_s: float = 5.0
) -> None:
    """Refuse ``url`` now if ``fetch_url``/``post_url`` would refuse it; connect to nothing.

    For URLs used later (callbacks), so that a bad one is a 400 before any work is accepted.
    The answer holds for the addresses the name has now; the later request resolves and
    checks again, so a name re-pointed at a private address meanwhile is still refused.

    Raises ``ServiceError``: 400 bad_url / fetch_refused, 422 fetch_failed / fetch_timeout.
    """
    allow = compile_allow_hosts(tuple(allow_hosts))
    settings = _Settings(
        max_bytes=0,
        timeout=httpx.Timeout(resolve_timeout_s),
        resolve_timeout_s=resolve_timeout_s,
        ssl_context=_default_ssl_context(),
    )
    await _resolve_and_check(_parse_url(url), allow, settings)


async def post_url(
    url: str,
    body: bytes,
    *,
    headers: Mapping[str, str],
    connect_timeout_s: float,
    read_timeout_s: float,
    allow_hosts: Sequence[str] = (),
    total_timeout_s: float | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """POST ``body`` to ``url`` with ``fetch_url``'s address rules; return the HTTP status.

    Redirects are not followed: a 3xx is returned like any other status. ``headers`` may not
    override Host (it names the checked endpoint). ``total_timeout_s`` bounds the whole call,
    by default ``connect + 2 * read`` (send, then answer).

    Raises ``ServiceError``: 400 bad_url / fetch_refused, 422 fetch_failed / fetch_timeout.
    """
    allow = compile_allow_hosts(tuple(allow_hosts))
    if total_timeout_s is None:
        total_timeout_s = connect_timeout_s + 2 * read_timeout_s
    settings = _Settings(
        max_bytes=_POST_MAX_RESPONSE_BYTES,
        timeout=httpx.Timeout(
            connect=connect_timeout_s,
            read=read_timeout_s,
            write=read_timeout_s,
            pool=connect_timeout_s,
        ),
        resolve_timeout_s=connect_timeout_s,
        ssl_context=ssl_context if ssl_context is not None else _default_ssl_context(),
    )
    try:
        async with asyncio.timeout(total_timeout_s):
            target = _parse_url(url)
            endpoint = await _resolve_and_check(target, allow, settings)
            return await _post(target, endpoint, body, headers, settings)
    except TimeoutError:
        raise ServiceError(
            422, "fetch_timeout", f"gave up posting to {_show(url)} after {total_timeout_s:g} s"
        ) from None


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


def address_problem(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be fetched from ("a loopback address", ...); None if public."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return address_problem(ip.ipv4_mapped)
    if ip in _METADATA_IPS:
        return "a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.sixtofour is not None:
            inner = address_problem(ip.sixtofour)
            if inner:
                return f"a 6to4 address embedding {ip.sixtofour}, {inner}"
        if ip.teredo is not None:
            return "a Teredo tunnel address"
        if ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            inner = address_problem(embedded)
            return f"a NAT64 address embedding {embedded}, {inner}" if inner else None
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


@dataclass(frozen=True)
class _Settings:
    max_bytes: int
    timeout: httpx.Timeout
    resolve_timeout_s: float
    ssl_context: ssl.SSLContext


@dataclass(frozen=True)
class _Endpoint:
    """Where one hop really goes, decided once: connect only to ``addresses``."""

    addresses: list[IPAddress]
    server_name: str  # for SNI/certificate checks: host name, or the canonical IP
    authority: str  # Host header value


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # lowercase ASCII as written (IDNA-encoded), IPv6 without brackets
    port: int
    path: str
    query: str

    @property
    def name(self) -> str:
        """The host as a DNS name for comparisons: no trailing dot."""
        return self.host.rstrip(".")


async def _fetch_following_redirects(
    url: str, allow: AllowList, max_redirects: int, settings: _Settings
) -> bytes:
    current = url
    for hop in range(max_redirects + 1):
        try:
            target = _parse_url(current)
            endpoint = await _resolve_and_check(target, allow, settings)
            location, body = await _get(target, endpoint, settings)
        except ServiceError as exc:
            if hop == 0:
                raise
            raise ServiceError(
                exc.status, exc.code, f"{exc.message} (after a redirect to {_show(current)})"
            ) from None
        if body is not None:
            return body
        current = urljoin(current, location)
    raise ServiceError(400, "fetch_refused", f"refused: more than {max_redirects} redirects")


def _parse_url(url: str) -> _Target:
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
    if scheme not in _DEFAULT_PORTS:
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
        raise ServiceError(400, "bad_url", f"invalid host in URL: {_show(netloc)}")
    port = int(m.group(2)) if m.group(2) else _DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise ServiceError(400, "bad_url", f"invalid port {port}")
    return _Target(scheme, host, port, parts.path or "/", parts.query)


def _idna(host: str) -> str | None:
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return None


async def _resolve_and_check(target: _Target, allow: AllowList, settings: _Settings) -> _Endpoint:
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
                settings.resolve_timeout_s,
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
    if target.port != _DEFAULT_PORTS[target.scheme]:
        authority = f"{authority}:{target.port}"
    return _Endpoint(addresses, server_name, authority)


def _refuse_unless_acceptable(
    target: _Target, numeric: bool, resolved: IPAddress, ip: IPAddress, allow: AllowList
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
    if resolved != ip:
        what = f"{resolved} (IPv4-mapped {ip})"
    else:
        what = str(ip)
    if not numeric:
        subject = f"{target.name} resolves to {what},"
    elif target.host == str(resolved):
        subject = f"{what} is"
    else:
        subject = f"{target.host} is {what},"  # e.g. "2130706433 is 127.0.0.1,"
    raise ServiceError(400, "fetch_refused", f"refused: {subject} {problem}")


async def _get(
    target: _Target, endpoint: _Endpoint, settings: _Settings
) -> tuple[str, None] | tuple[None, bytes]:
    """One GET against the checked addresses: ``(location, None)`` or ``(None, body)``."""
    return await _on_checked_addresses(
        target, endpoint, "reading from", lambda ip: _get_from(target, ip, endpoint, settings)
    )


async def _on_checked_addresses(
    target: _Target,
    endpoint: _Endpoint,
    phase: str,
    attempt: Callable[[IPAddress], Awaitable[_T]],
) -> _T:
    """`attempt` on each checked address in turn. The next address is tried only when the
    connection failed, i.e. before any request bytes can have been delivered."""
    last_error: httpx.ConnectError | None = None
    for ip in endpoint.addresses[:_MAX_ADDRESSES_TRIED]:
        try:
            return await attempt(ip)
        except httpx.ConnectError as exc:  # refused/unreachable/TLS failure: try the next one
            last_error = exc
        except httpx.TimeoutException as exc:
            what = "connecting to" if isinstance(exc, httpx.ConnectTimeout) else phase
            raise ServiceError(422, "fetch_timeout", f"timed out {what} {target.name}") from None
        except httpx.HTTPError as exc:
            raise ServiceError(
                422, "fetch_failed", f"error talking to {target.name}: {_describe(exc)}"
            ) from None
    raise ServiceError(
        422, "fetch_failed", f"could not connect to {target.name}: {_describe(last_error)}"
    )


async def _get_from(
    target: _Target, ip: IPAddress, endpoint: _Endpoint, settings: _Settings
) -> tuple[str, None] | tuple[None, bytes]:
    # The IP literal in the URL is what gets connected to; nothing below resolves names.
    raw_path = quote(target.path, safe=_PATH_SAFE)
    if target.query:
        raw_path += "?" + quote(target.query, safe=_QUERY_SAFE)
    try:
        request_url = httpx.URL(
            scheme=target.scheme, host=str(ip), port=target.port, raw_path=raw_path.encode()
        )
    except httpx.InvalidURL as exc:
        raise ServiceError(400, "bad_url", f"invalid URL: {exc}") from None
    headers = {
        "Host": endpoint.authority,
        "User-Agent": _USER_AGENT,
        "Accept": "image/*",
        # Compressed bodies would let a small download inflate past the byte cap in memory.
        "Accept-Encoding": "identity",
    }
    # httpcore passes sni_hostname as the TLS server_hostname: SNI and the certificate check
    # are for the original name although the socket goes to an IP literal.
    extensions = {"sni_hostname": endpoint.server_name} if target.scheme == "https" else {}
    # A fresh client per hop: a pooled TLS connection verified for one name must not be
    # reused for another name that happens to share the IP.
    async with (
        httpx.AsyncClient(
            verify=settings.ssl_context,
            trust_env=False,  # no proxies or .netrc from the environment
            follow_redirects=False,
            timeout=settings.timeout,
        ) as client,
        client.stream("GET", request_url, headers=headers, extensions=extensions) as response,
    ):
        status = response.status_code
        if status in _REDIRECT_STATUSES:
            location = response.headers.get("location")
            if not location:
                raise ServiceError(
                    422, "fetch_failed", f"{target.name} answered {status} without a Location"
                )
            return location, None
        if not 200 <= status < 300:
            reason = f"HTTP {status} {response.reason_phrase}".strip()
            raise ServiceError(422, "fetch_failed", f"{target.name} answered {reason}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ServiceError(
                422, "fetch_failed", f"{target.name} sent a {encoding!r}-encoded body"
            )
        return None, await _read_capped(response, settings.max_bytes)


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ServiceError(
            413, "too_large", f"the image is {declared} bytes; the limit is {max_bytes}"
        )
    body = bytearray()
    prefix_checked = False
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > max_bytes:
            raise ServiceError(413, "too_large", f"the image is over the {max_bytes} byte limit")
        # Refuse an obvious non-image after its first bytes instead of downloading all of it.
        if not prefix_checked and len(body) >= SNIFF_PREFIX_BYTES:
            prefix_checked = True
            _refuse_non_image(bytes(body[:SNIFF_PREFIX_BYTES]), response)
    data = bytes(body)
    _refuse_non_image(data, response)
    return data


def _refuse_non_image(data: bytes, response: httpx.Response) -> None:
    if sniff(data) is None:
        ctype = response.headers.get("content-type", "no Content-Type")
        raise ServiceError(
            415,
            "not_an_image",
            f"the URL did not return a JPEG, PNG, WebP, BMP, GIF or TIFF image ({ctype})",
        )


async def _post(
    target: _Target,
    endpoint: _Endpoint,
    body: bytes,
    headers: Mapping[str, str],
    settings: _Settings,
) -> int:
    """One POST against the checked addresses; its answer's status."""
    return await _on_checked_addresses(
        target,
        endpoint,
        "posting to",
        lambda ip: _post_to(target, ip, endpoint, body, headers, settings),
    )


async def _post_to(
    target: _Target,
    ip: IPAddress,
    endpoint: _Endpoint,
    body: bytes,
    headers: Mapping[str, str],
    settings: _Settings,
) -> int:
    # Same shape as _get_from: the IP literal is what gets connected to, the name goes into
    # Host and SNI, and the client is fresh so no pooled connection crosses names.
    raw_path = quote(target.path, safe=_PATH_SAFE)
    if target.query:
        raw_path += "?" + quote(target.query, safe=_QUERY_SAFE)
    try:
        request_url = httpx.URL(
            scheme=target.scheme, host=str(ip), port=target.port, raw_path=raw_path.encode()
        )
    except httpx.InvalidURL as exc:
        raise ServiceError(400, "bad_url", f"invalid URL: {exc}") from None
    sent = {k: v for k, v in headers.items() if k.lower() != "host"}
    sent.setdefault("User-Agent", _POST_USER_AGENT)
    sent["Host"] = endpoint.authority
    extensions = {"sni_hostname": endpoint.server_name} if target.scheme == "https" else {}
    async with (
        httpx.AsyncClient(
            verify=settings.ssl_context,
            trust_env=False,
            follow_redirects=False,
            timeout=settings.timeout,
        ) as client,
        client.stream(
            "POST", request_url, content=body, headers=sent, extensions=extensions
        ) as response,
    ):
        # Drain a little of the answer so a well-behaved server sees a clean exchange; a
        # chatty one is cut off rather than read in full.
        received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
            if received >= settings.max_bytes:
                break
        return response.status_code


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle costs milliseconds; one context serves every connection.
    return httpx.create_ssl_context()


def _describe(exc: BaseException | None) -> str:
    text = str(exc) if exc is not None else ""
    return text or type(exc).__name__


def _show(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."

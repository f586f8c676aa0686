"""The HTTP client behind image URLs and job callbacks, on top of the address policy.

``serve_app.inputs.addresses`` decides where one hop may go and resolves it once; this
module talks HTTP to exactly the addresses it checked:

4. Connect to the checked IP itself: the request URL carries the IP literal, so nothing
   resolves the name again (no DNS-rebinding window). The original name goes into the Host
   header and, for https, into ``sni_hostname``, which httpcore uses as the TLS
   ``server_hostname``: SNI and certificate verification are done for the original name.
5. Redirects are not followed by httpx; each Location goes through the policy again.

``fetch_url`` GETs an image (following redirects that way); ``post_url`` sends a body (job
callbacks) under the same rules and follows no redirect at all: replaying a POST body to
wherever a 3xx points is exactly the proxying refused here.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote, urljoin

import httpx

from serve_app.errors import ServiceError
from serve_app.inputs.addresses import (
    AllowList,
    Endpoint,
    IPAddress,
    Target,
    compile_allow_hosts,
    parse_url,
    resolve_and_check,
    show,
)
from serve_app.inputs.imageinfo import ACCEPTED, ACCEPTED_NAMES, SNIFF_PREFIX_BYTES, sniff
from serve_app.metrics import observe_fetch

_T = TypeVar("_T")

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Several A/AAAA records are normal; each one is checked, but trying them all on connection
# failure would multiply the connect timeout.
_MAX_ADDRESSES_TRIED = 3
_USER_AGENT = "visionserve-fetch/1"
_POST_USER_AGENT = "visionserve-callback/1"
# A callback receiver's answer is read only to free the connection: its content is unused.
_POST_MAX_RESPONSE_BYTES = 64 * 1024
# Kept unescaped when re-encoding path and query: RFC 3986 reserved + unreserved + "%".
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


@dataclass(frozen=True)
class _Settings:
    max_bytes: int
    timeout: httpx.Timeout
    resolve_timeout_s: float
    ssl_context: ssl.SSLContext

    @classmethod
    def of(
        cls,
        max_bytes: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        ssl_context: ssl.SSLContext | None,
    ) -> _Settings:
        timeout = httpx.Timeout(
            connect=connect_timeout_s,
            read=read_timeout_s,
            write=read_timeout_s,
            pool=connect_timeout_s,
        )
        context = ssl_context if ssl_context is not None else _default_ssl_context()
        return cls(max_bytes, timeout, connect_timeout_s, context)


@observe_fetch
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
    settings = _Settings.of(max_bytes, connect_timeout_s, read_timeout_s, ssl_context)
    try:
        async with asyncio.timeout(total_timeout_s):
            return await _fetch_following_redirects(url, allow, max_redirects, settings)
    except TimeoutError:
        raise ServiceError(
            422, "fetch_timeout", f"gave up fetching {show(url)} after {total_timeout_s:g} s"
        ) from None


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
    settings = _Settings.of(
        _POST_MAX_RESPONSE_BYTES, connect_timeout_s, read_timeout_s, ssl_context
    )
    try:
        async with asyncio.timeout(total_timeout_s):
            target = parse_url(url)
            endpoint = await resolve_and_check(target, allow, settings.resolve_timeout_s)
            return await _on_checked_addresses(
                target,
                endpoint,
                "posting to",
                lambda ip: _post_to(target, ip, endpoint, body, headers, settings),
            )
    except TimeoutError:
        raise ServiceError(
            422, "fetch_timeout", f"gave up posting to {show(url)} after {total_timeout_s:g} s"
        ) from None


async def _fetch_following_redirects(
    url: str, allow: AllowList, max_redirects: int, settings: _Settings
) -> bytes:
    current = url
    for hop in range(max_redirects + 1):
        try:
            target = parse_url(current)
            endpoint = await resolve_and_check(target, allow, settings.resolve_timeout_s)
            get = functools.partial(_get_from, target, endpoint=endpoint, settings=settings)
            location, body = await _on_checked_addresses(target, endpoint, "reading from", get)
        except ServiceError as exc:
            if hop == 0:
                raise
            raise ServiceError(
                exc.status, exc.code, f"{exc.message} (after a redirect to {show(current)})"
            ) from None
        if body is not None:
            return body
        current = urljoin(current, location)
    raise ServiceError(400, "fetch_refused", f"refused: more than {max_redirects} redirects")


async def _on_checked_addresses(
    target: Target,
    endpoint: Endpoint,
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


@asynccontextmanager
async def _exchange(
    method: str,
    target: Target,
    ip: IPAddress,
    endpoint: Endpoint,
    headers: Mapping[str, str],
    settings: _Settings,
    content: bytes | None = None,
) -> AsyncIterator[httpx.Response]:
    """One request to the checked address `ip`, its answer streamed."""
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
    # The Host header names the checked endpoint; a caller's Host cannot redirect it.
    sent = {k: v for k, v in headers.items() if k.lower() != "host"}
    sent["Host"] = endpoint.authority
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
        client.stream(
            method, request_url, content=content, headers=sent, extensions=extensions
        ) as response,
    ):
        yield response


async def _get_from(
    target: Target, ip: IPAddress, endpoint: Endpoint, settings: _Settings
) -> tuple[str, None] | tuple[None, bytes]:
    """One GET: ``(location, None)`` for a redirect or ``(None, body)``."""
    headers = {
        "User-Agent": _USER_AGENT,
        "Accept": "image/*",
        # Compressed bodies would let a small download inflate past the byte cap in memory.
        "Accept-Encoding": "identity",
    }
    async with _exchange("GET", target, ip, endpoint, headers, settings) as response:
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


async def _post_to(
    target: Target,
    ip: IPAddress,
    endpoint: Endpoint,
    body: bytes,
    headers: Mapping[str, str],
    settings: _Settings,
) -> int:
    """One POST; its answer's status."""
    sent = dict(headers)
    sent.setdefault("User-Agent", _POST_USER_AGENT)
    async with _exchange("POST", target, ip, endpoint, sent, settings, body) as response:
        # Drain a little of the answer so a well-behaved server sees a clean exchange; a
        # chatty one is cut off rather than read in full.
        received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
            if received >= settings.max_bytes:
                break
        return response.status_code


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
    # The same accepted types as the decoder (imageinfo.ACCEPTED): a GIF stops here too,
    # after its first bytes, rather than after the whole download.
    info = sniff(data)
    if info is None or info.format not in ACCEPTED:
        ctype = response.headers.get("content-type", "no Content-Type")
        what = f"a {info.format.upper()} image" if info else f"no image ({ctype})"
        raise ServiceError(415, "not_an_image", f"the URL returned {what}; send {ACCEPTED_NAMES}")


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle costs milliseconds; one context serves every connection.
    return httpx.create_ssl_context()


def _describe(exc: BaseException | None) -> str:
    text = str(exc) if exc is not None else ""
    return text or type(exc).__name__


def _describe(exc: BaseException | None) -> str:
    text = str(exc) if exc is not None else ""
    return text or type(exc).__name__

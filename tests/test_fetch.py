"""SSRF-safe fetching, against real loopback HTTP(S) servers and a fake resolver.

Nothing here may send a packet off this machine, even if fetch.py is wrong:
- every test runs with pytest-socket restricting connect() to 127.0.0.1 and ::1 (the marker,
  and the autouse fixture, which applies it even when the plugin is not loaded);
- socket.getaddrinfo is replaced by a resolver that answers numeric hosts locally
  (AI_NUMERICHOST: libc parses them, as it would in production) and names from a table, so
  no DNS query leaves either;
- every event loop is a plain selector loop, whose connect() goes through socket.socket.connect
  where the guard sits (uvloop's native connect would bypass it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np
import pytest
import pytest_socket

from serve_app.errors import ServiceError
from serve_app.inputs.addresses import address_problem, compile_allow_hosts
from serve_app.inputs.fetch import fetch_url

pytestmark = pytest.mark.allow_hosts(["127.0.0.1", "::1"])

PUBLIC_IP = "93.184.216.34"  # a public address that is never contacted (the guard blocks it)
PNG = cv2.imencode(".png", np.full((12, 16, 3), 90, np.uint8))[1].tobytes()
FAST = {"max_bytes": 1_000_000, "connect_timeout_s": 1.0, "read_timeout_s": 1.0}
STOP = threading.Event()  # cuts the slow handlers short at teardown

_real_getaddrinfo = pytest_socket._true_getaddrinfo


# --------------------------------------------------------------------------- sandbox


class FakeDNS:
    def __init__(self) -> None:
        self.table: dict[str, list[str] | Callable[[], list[str]]] = {
            "localhost": ["127.0.0.1", "::1"],
            "localhost.": ["127.0.0.1", "::1"],
            "loopback.test": ["127.0.0.1"],
            "metadata.google.internal": ["169.254.169.254"],
            "public.test": [PUBLIC_IP],
            "mixed.test": [PUBLIC_IP, "10.0.0.1"],
            "tunnel.test": ["2002:7f00:1::1"],
            "img.test": ["127.0.0.1"],
            "wrong.test": ["127.0.0.1"],
        }
        self.lookups: list[str] = []

    def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):  # noqa: A002
        host = host.decode() if isinstance(host, bytes) else host
        try:
            return _real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        except socket.gaierror:
            if flags & socket.AI_NUMERICHOST:
                raise
        self.lookups.append(host)
        answer = self.table.get(host.lower())
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: unknown to the test resolver")
        addresses = answer() if callable(answer) else answer
        port = int(port or 0)
        out = []
        for a in addresses:
            if ipaddress.ip_address(a).version == 6:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)))
        return out


@pytest.fixture(autouse=True)
def sandbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDNS]:
    # Registered with monkeypatch first, so that undoing restores the pre-test connect even
    # when a test patches connect again on top of the guard.
    monkeypatch.setattr(socket.socket, "connect", socket.socket.connect)
    pytest_socket.socket_allow_hosts(["127.0.0.1", "::1"])
    dns = FakeDNS()
    monkeypatch.setattr(socket, "getaddrinfo", dns.getaddrinfo)
    yield dns


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every address a socket tries to connect to; off-loopback ones are refused here."""
    seen: list[str] = []
    guarded = socket.socket.connect

    def recording_connect(sock, address, *rest):
        host = address[0] if isinstance(address, tuple) else str(address)
        seen.append(host)
        if host not in ("127.0.0.1", "::1"):
            raise ConnectionRefusedError(111, f"test: not connecting to {host}")
        return guarded(sock, address, *rest)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    return seen


def run(coro):
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(coro)


def fetch(url: str, **kw) -> bytes:
    return run(fetch_url(url, **{**FAST, **kw}))


def refused(url: str, **kw) -> ServiceError:
    with pytest.raises(ServiceError) as exc:
        fetch(url, **kw)
    return exc.value


@pytest.mark.filterwarnings("ignore::UserWarning")  # pytest-socket warns as it blocks
def test_sandbox_blocks_off_machine_connections() -> None:
    with pytest.raises(pytest_socket.SocketConnectBlockedError):
        socket.create_connection(("10.0.0.1", 80), timeout=0.2)

    async def via_event_loop() -> None:
        await asyncio.open_connection("10.0.0.1", 80)

    with pytest.raises(pytest_socket.SocketConnectBlockedError):
        run(via_event_loop())
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("example.com", 80)  # no DNS either


# --------------------------------------------------------------------------- servers


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Host")))
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        if path == "/img.png":
            self.reply(200, PNG, "image/png")
        elif path == "/img-as-text":
            self.reply(200, PNG, "text/plain")  # bytes decide, not the header
        elif path == "/text":
            self.reply(200, b"<html><body>" + b"x" * 500 + b"</body></html>", "text/html")
        elif path == "/empty":
            self.reply(200, b"", "image/png")
        elif path == "/missing":
            self.reply(404, b"not here", "text/plain")
        elif path == "/redirect":
            self.redirect(query["to"][0])
        elif path.startswith("/chain/"):
            n = int(path.rsplit("/", 1)[1])
            self.redirect(f"/chain/{n - 1}") if n > 0 else self.reply(200, PNG, "image/png")
        elif path == "/big":  # no Content-Length: the cap must hold while streaming
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.write_quietly(PNG[:32] + b"\x00" * 3_000_000)
        elif path == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10**10))
            self.end_headers()
            self.write_quietly(PNG[:32])
        elif path == "/slow":
            STOP.wait(3)
            self.reply(200, PNG, "image/png")
        elif path == "/trickle":  # each byte arrives well within the read timeout
            self.send_response(200)
            self.end_headers()
            for b in PNG:
                if STOP.wait(0.05) or not self.write_quietly(bytes([b])):
                    break
        elif path == "/gzip":
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.write_quietly(PNG)
        else:
            self.reply(500, b"unknown test path", "text/plain")

    def reply(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.write_quietly(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def write_quietly(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except OSError:  # the client gave up on purpose
            return False


def start(server: ThreadingHTTPServer) -> str:
    server.seen = []
    server.daemon_threads = True
    loop = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    loop.start()
    return str(server.server_address[1])


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadingHTTPServer]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.base = f"http://127.0.0.1:{start(srv)}"
    yield srv
    STOP.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[ThreadingHTTPServer]:
    """HTTPS on 127.0.0.1 with a certificate for img.test only (no IP in it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "img.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("img.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert_pem)
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    sni_seen: list[str | None] = []
    server_ctx.sni_callback = lambda sock, server_name, ctx: sni_seen.append(server_name)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.socket = server_ctx.wrap_socket(srv.socket, server_side=True)
    srv.port = start(srv)
    srv.sni_seen = sni_seen
    srv.client_ctx = ssl.create_default_context(cadata=cert_pem.decode())
    yield srv
    srv.shutdown()
    srv.server_close()


# --------------------------------------------------------------------------- refusals

REFUSED = [
    # (url, status, words the detail must contain)
    ("http://127.0.0.1/x.png", 400, "127.0.0.1 is a loopback"),
    ("https://127.0.0.1/x.png", 400, "loopback"),
    ("http://localhost/x.png", 400, "localhost resolves to a loopback address"),
    ("http://localhost./x.png", 400, "loopback"),
    ("http://LocalHost:8080/x.png", 400, "loopback"),
    ("http://loopback.test/x.png", 400, "loopback.test resolves to a loopback"),
    ("http://0.0.0.0/", 400, "unspecified"),
    ("http://0/", 400, "0 is 0.0.0.0, an unspecified"),
    ("http://[::1]/", 400, "loopback"),
    ("http://[::]/", 400, "unspecified"),
    ("http://10.0.0.1/", 400, "10.0.0.1 is a private address"),
    ("http://172.16.0.1/", 400, "private"),
    ("http://192.168.1.1/", 400, "private"),
    ("http://169.254.169.254/latest/meta-data/", 400, "metadata"),
    ("http://169.254.1.1/", 400, "link-local"),
    ("http://100.64.0.1/", 400, "CGNAT"),
    ("http://100.100.100.200/", 400, "metadata"),
    ("http://[fd00::1]/", 400, "unique-local"),
    ("http://[fec0::1]/", 400, "site-local"),
    ("http://[fe80::1]/", 400, "link-local"),
    ("http://[fd00:ec2::254]/", 400, "metadata"),
    ("http://[::ffff:127.0.0.1]/", 400, "IPv4-mapped 127.0.0.1) is a loopback"),
    ("http://[::ffff:10.0.0.1]/", 400, "private"),
    ("http://[::ffff:169.254.169.254]/", 400, "metadata"),
    ("http://[::127.0.0.1]/", 400, "reserved"),  # deprecated IPv4-compatible form
    ("http://[2002:7f00:1::1]/", 400, "6to4 address embedding 127.0.0.1"),
    ("http://[2002:a9fe:a9fe::1]/", 400, "metadata"),  # 6to4 of 169.254.169.254
    ("http://[64:ff9b::a00:1]/", 400, "NAT64 address embedding 10.0.0.1"),
    ("http://[2001::1]/", 400, "Teredo"),
    ("http://[ff02::1]/", 400, "multicast"),
    ("http://2130706433/", 400, "2130706433 is 127.0.0.1, a loopback"),
    ("http://0177.0.0.1/", 400, "0177.0.0.1 is 127.0.0.1"),
    ("http://0x7f000001/", 400, "0x7f000001 is 127.0.0.1"),
    ("http://0x7f.1/", 400, "is 127.0.0.1"),
    ("http://017700000001/", 400, "is 127.0.0.1"),
    ("http://127.1/", 400, "127.1 is 127.0.0.1"),
    ("http://224.0.0.1/", 400, "multicast"),
    ("http://240.0.0.1/", 400, "reserved"),
    ("http://255.255.255.255/", 400, "broadcast"),
    ("http://198.18.0.1/", 400, "non-public"),  # benchmarking range
    ("http://192.0.2.1/", 400, "non-public"),  # TEST-NET-1
    ("http://metadata.google.internal/computeMetadata/v1/", 400, "metadata name"),
    ("http://metadata/computeMetadata/v1/", 400, "metadata name"),
    ("http://mixed.test/", 400, "mixed.test resolves to a private address"),  # one is enough
    ("http://tunnel.test/", 400, "resolves to a 6to4 address embedding a loopback address"),
    ("ftp://example.com/x.png", 400, "scheme 'ftp'"),
    ("file:///etc/passwd", 400, "scheme 'file'"),
    ("gopher://127.0.0.1:70/_GET", 400, "scheme 'gopher'"),
    ("javascript:alert(1)", 400, "scheme"),
    ("//example.com/x.png", 400, "scheme"),
    ("http:///x.png", 400, "no host"),
    ("http://", 400, "no host"),
    ("http://:80/", 400, "invalid host"),
    ("http://user:pw@example.com/x.png", 400, "credentials"),
    ("http://example.com@127.0.0.1/", 400, "credentials"),
    ("http://example.com\\@127.0.0.1/", 400, "backslash"),
    ("http://127.0.0.1\t/", 400, "whitespace"),
    ("http://127.0.0.%31/", 400, "percent-encoded"),
    ("http://[fe80::1%25eth0]/", 400, "zoned"),
    ("http://127.0.0.1:99999/", 400, "invalid"),
    ("http://127.0.0.1:80:80/", 400, "invalid host"),
    ("http://[::1/", 400, ""),
    ("http://no-such-host.test/", 422, "could not resolve"),
]


@pytest.mark.parametrize(("url", "status", "words"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_before_any_connection(url, status, words, connects) -> None:
    err = refused(url)
    assert err.status == status, err
    assert words in err.message, err
    if status == 400:
        assert err.code in ("bad_url", "fetch_refused")
    assert connects == []


def test_refused_form_count() -> None:
    """The table reaches every refusal rule the address policy has, read from its code."""
    import ast
    import inspect
    import textwrap

    from serve_app.inputs import addresses

    tree = ast.parse(textwrap.dedent(inspect.getsource(addresses.address_problem)))
    rules = {
        node.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Return)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }
    assert len(rules) >= 12, rules  # the reader above still finds the rules
    messages = [refused(url).message for url, status, _ in REFUSED if status == 400]
    missed = sorted(r for r in rules if not any(r in m for m in messages))
    assert not missed, f"no REFUSED row hits the rule(s) {missed}"


def test_a_refusal_names_the_rule_not_the_address_a_name_has() -> None:
    """The caller learns why, not what internal DNS says (a numeric host is their own)."""
    for url, hidden in [
        ("http://mixed.test/", "10.0.0.1"),
        ("http://localhost/", "127.0.0.1"),
        ("http://tunnel.test/", "127.0.0.1"),
        ("http://tunnel.test/", "2002:"),
    ]:
        err = refused(url)
        assert err.code == "fetch_refused" and hidden not in err.message, err


def test_address_problem_agrees_with_public_addresses() -> None:
    for public in ("93.184.216.34", "8.8.8.8", "2606:4700::1111", "64:ff9b::808:808"):
        assert address_problem(ipaddress.ip_address(public)) is None, public
    assert address_problem(ipaddress.ip_address("2002:808:808::1")) is None  # 6to4 of 8.8.8.8


def test_allow_hosts_entries_are_validated() -> None:
    allow = compile_allow_hosts(("127.0.0.1", "LocalHost.", "10.0.0.0/8", "[::1]", " "))
    assert allow.names == {"localhost"}
    assert len(allow.networks) == 3
    with pytest.raises(ValueError):
        compile_allow_hosts(("not a host!",))


def test_allowlist_does_not_open_metadata(connects) -> None:
    err = refused("http://169.254.169.254/", allow_hosts=["169.254.0.0/16"])
    assert "metadata" in err.message
    err = refused("http://metadata.google.internal/", allow_hosts=["metadata.google.internal"])
    assert "metadata" in err.message
    assert connects == []


# --------------------------------------------------------------------------- fetching


def test_allowlisted_local_server_serves_png(server, connects) -> None:
    port = server.base.rsplit(":", 1)[1]
    assert fetch(f"{server.base}/img.png", allow_hosts=["127.0.0.1"]) == PNG
    assert fetch(f"{server.base}/img-as-text", allow_hosts=["127.0.0.0/8"]) == PNG
    assert fetch(f"http://localhost:{port}/img.png?a=1&b=%20", allow_hosts=["localhost"]) == PNG
    assert connects == ["127.0.0.1"] * 3
    assert server.seen[-1] == ("/img.png?a=1&b=%20", f"localhost:{port}")  # Host kept


def test_numeric_shorthand_is_fetched_as_its_canonical_address(server, connects) -> None:
    port = server.base.rsplit(":", 1)[1]
    assert fetch(f"http://2130706433:{port}/img.png", allow_hosts=["127.0.0.1"]) == PNG
    assert server.seen[-1][1] == f"127.0.0.1:{port}"
    assert connects == ["127.0.0.1"]


def test_not_allowlisted_local_server_is_refused(server, connects) -> None:
    err = refused(f"{server.base}/img.png", allow_hosts=["127.0.0.2", "10.0.0.0/8"])
    assert err.status == 400 and "loopback" in err.message
    assert connects == []


def test_redirect_to_private_address_is_refused_before_connecting(server, connects) -> None:
    url = f"{server.base}/redirect?to=http://10.0.0.1/x.png"
    err = refused(url, allow_hosts=["127.0.0.1"])
    assert (err.status, err.code) == (400, "fetch_refused")
    assert "10.0.0.1 is a private address" in err.message and "redirect" in err.message
    assert connects == ["127.0.0.1"]


def test_redirect_to_other_loopback_address_is_refused(server, connects) -> None:
    port = server.base.rsplit(":", 1)[1]
    err = refused(
        f"{server.base}/redirect?to=http://127.0.0.2:{port}/img.png", allow_hosts=["127.0.0.1"]
    )
    assert err.status == 400 and "127.0.0.2 is a loopback" in err.message
    for target in ("http://[::ffff:7f00:2]/", "http://2130706434/", "file:///etc/passwd"):
        err = refused(f"{server.base}/redirect?to={target}", allow_hosts=["127.0.0.1"])
        assert err.status == 400, target
    assert set(connects) == {"127.0.0.1"}


def test_relative_redirects_and_the_redirect_limit(server) -> None:
    ok = ["127.0.0.1"]
    assert fetch(f"{server.base}/redirect?to=/img.png", allow_hosts=ok) == PNG
    assert fetch(f"{server.base}/chain/3", allow_hosts=ok) == PNG
    err = refused(f"{server.base}/chain/4", allow_hosts=ok)
    assert (err.status, err.code) == (400, "fetch_refused") and "redirects" in err.message
    err = refused(f"{server.base}/chain/1", allow_hosts=ok, max_redirects=0)
    assert "more than 0 redirects" in err.message


def test_body_over_the_cap_is_refused_while_streaming(server) -> None:
    started = time.monotonic()
    err = refused(f"{server.base}/big", allow_hosts=["127.0.0.1"], max_bytes=100_000)
    assert (err.status, err.code) == (413, "too_large")
    err = refused(f"{server.base}/big-declared", allow_hosts=["127.0.0.1"], max_bytes=100_000)
    assert (err.status, err.code) == (413, "too_large")
    assert time.monotonic() - started < 2
    assert fetch(f"{server.base}/img.png", allow_hosts=["127.0.0.1"], max_bytes=len(PNG)) == PNG
    err = refused(f"{server.base}/img.png", allow_hosts=["127.0.0.1"], max_bytes=len(PNG) - 1)
    assert err.status == 413


def test_slow_server_times_out_quickly(server) -> None:
    started = time.monotonic()
    err = refused(f"{server.base}/slow", allow_hosts=["127.0.0.1"], read_timeout_s=0.3)
    assert (err.status, err.code) == (422, "fetch_timeout")
    assert time.monotonic() - started < 1.5


def test_trickling_server_hits_the_total_deadline(server) -> None:
    started = time.monotonic()
    err = refused(
        f"{server.base}/trickle",
        allow_hosts=["127.0.0.1"],
        read_timeout_s=0.5,
        total_timeout_s=0.4,
    )
    assert (err.status, err.code) == (422, "fetch_timeout")
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    ("path", "status", "error", "words"),
    [
        ("/text", 415, "not_an_image", "text/html"),
        ("/empty", 415, "not_an_image", ""),
        ("/missing", 422, "fetch_failed", "HTTP 404"),
        ("/gzip", 422, "fetch_failed", "gzip"),
    ],
)
def test_upstream_answers_that_are_not_images(server, path, status, error, words) -> None:
    err = refused(f"{server.base}{path}", allow_hosts=["127.0.0.1"])
    assert (err.status, err.code) == (status, error)
    assert words in err.message


def test_connection_refused_is_fetch_failed(connects) -> None:
    with socket.socket() as s:  # a port that is closed: bind, read the number, close
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = refused(f"http://127.0.0.1:{port}/", allow_hosts=["127.0.0.1"])
    assert (err.status, err.code) == (422, "fetch_failed")


# --------------------------------------------------------------------------- pinning


def test_dns_rebinding_connects_only_to_the_checked_address(sandbox, server, connects) -> None:
    """First answer public, later answers loopback: only the first is ever used."""
    answers = iter([[PUBLIC_IP]])
    sandbox.table["rebind.test"] = lambda: next(answers, ["127.0.0.1"])
    port = server.base.rsplit(":", 1)[1]
    before = len(server.seen)
    err = refused(f"http://rebind.test:{port}/img.png", allow_hosts=["127.0.0.1"])
    assert (err.status, err.code) == (422, "fetch_failed")  # the test refused the connect
    assert sandbox.lookups.count("rebind.test") == 1
    assert connects == [PUBLIC_IP]  # never 127.0.0.1, although the name now says so
    assert len(server.seen) == before


def test_pinned_address_keeps_the_host_header(sandbox, server, connects) -> None:
    """First answer allowlisted, later answers private: the fetch uses the first, once."""
    answers = iter([["127.0.0.1"]])
    sandbox.table["pinned.test"] = lambda: next(answers, ["10.0.0.1"])
    port = server.base.rsplit(":", 1)[1]
    assert fetch(f"http://pinned.test:{port}/img.png", allow_hosts=["127.0.0.1"]) == PNG
    assert sandbox.lookups.count("pinned.test") == 1
    assert connects == ["127.0.0.1"]
    assert server.seen[-1] == ("/img.png", f"pinned.test:{port}")


def test_https_verifies_the_original_host_name(tls_server, connects) -> None:
    port = tls_server.port
    ctx = tls_server.client_ctx
    # The socket goes to 127.0.0.1, which the certificate does not name: success means the
    # certificate was checked against img.test, and the server saw img.test as SNI.
    data = fetch(f"https://img.test:{port}/img.png", allow_hosts=["img.test"], ssl_context=ctx)
    assert data == PNG
    assert tls_server.sni_seen[-1] == "img.test"
    assert tls_server.seen[-1] == ("/img.png", f"img.test:{port}")
    # Same server, same IP, another name: the certificate does not match it.
    err = refused(f"https://wrong.test:{port}/img.png", allow_hosts=["127.0.0.1"], ssl_context=ctx)
    assert (err.status, err.code) == (422, "fetch_failed")
    assert "hostname mismatch" in err.message.lower(), err
    # And without our CA the default trust store refuses the self-signed certificate.
    err = refused(f"https://img.test:{port}/img.png", allow_hosts=["img.test"])
    assert err.status == 422
    assert set(connects) == {"127.0.0.1"}

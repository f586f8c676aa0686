"""The optional API key.

The middleware is tested in-process, on a tiny FastAPI app with the real middleware and the
same error JSON, through Starlette's TestClient: real HTTP semantics (headers, status,
bodies) in milliseconds, and any key can be set per test. Doing the same through Serve would
need a second app deployed with the key in its replica environment (~30 s, and the session
service must stay keyless for the other tests). What only Serve can show is covered by the
end-to-end checks at the bottom: the real `api` carries the middleware, and the session
service, which has no key, leaves every route open.
"""

from __future__ import annotations

import base64

import pytest
from fastapi import FastAPI, Request, WebSocket
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from serve_app import auth
from serve_app.auth import ApiKeyMiddleware, api_key, configure_auth, credentials

KEY = "s3cret-Key_with.chars~"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def make_app(key: str | None) -> FastAPI:
    app = FastAPI()
    app.add_middleware(ApiKeyMiddleware, key_source=lambda: key)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/detect/{model}")
    async def detect(model: str, request: Request) -> dict:
        return {"model": model, "bytes": len(await request.body())}

    @app.post("/function/{name}")
    async def function(name: str) -> dict:
        return {"name": name}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"models": []}

    @app.api_route("/", methods=["GET", "POST"], include_in_schema=False)
    async def index() -> dict:
        return {"page": "index"}

    @app.get("/static/{name}")
    async def static(name: str) -> dict:
        return {"file": name}

    return app


@pytest.fixture(scope="module")
def locked() -> TestClient:
    return TestClient(make_app(KEY))


def assert_401(r, detail_part: str = "") -> None:
    assert r.status_code == 401, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["www-authenticate"].startswith('Bearer realm="visionserve"')
    body = r.json()
    assert set(body) == {"error", "detail", "request_id"} and body["error"] == "unauthorized"
    assert detail_part in body["detail"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", "/v1/detect/cnn-face-detection"),
        ("post", "/function/face-detect-pigo"),
        ("get", "/v1/models"),
        ("get", "/docs"),
        ("get", "/openapi.json"),
        ("get", "/nowhere"),
    ],
)
def test_every_api_route_needs_the_key(locked, method, path):
    assert_401(locked.request(method, path), "needs an API key")
    r = locked.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code != 401, r.text


def test_healthz_is_open(locked):
    assert locked.get("/healthz").json() == {"status": "ok"}
    # Even with wrong credentials: a probe sending junk must not fail the health check.
    assert locked.get("/healthz", headers={"Authorization": "Bearer nope"}).status_code == 200


def test_healthz_exemption_is_exact(locked):
    for path in ("/healthz/", "/healthzz", "/healthz/../v1/models", "/HEALTHZ"):
        assert locked.get(path).status_code == 401, path


def test_web_page_loads_without_the_key(locked):
    # The page asks for the key itself and sends it on its API calls.
    assert locked.get("/").json() == {"page": "index"}
    assert locked.get("/static/app.js").json() == {"file": "app.js"}
    assert locked.head("/static/app.js").status_code != 401  # 405 here: the route has no HEAD
    # Only reading the page's files: anything else on those paths needs the key.
    assert_401(locked.post("/"))
    assert_401(locked.get("/staticx/app.js"))
    assert_401(locked.get("/index.html"))


def test_bearer_key_passes_and_body_reaches_the_route(locked):
    r = locked.post("/v1/detect/x", content=b"abc", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json() == {"model": "x", "bytes": 3}
    # The scheme is case-insensitive (RFC 7235); surrounding spaces are tolerated.
    r = locked.post("/v1/detect/x", headers={"Authorization": f"  bearer   {KEY} "})
    assert r.status_code == 200


@pytest.mark.parametrize(
    "header",
    [
        f"Bearer {KEY}x",
        f"Bearer {KEY[:-1]}",
        "Bearer x",
        f"Bearer {KEY.upper()}",
        f"Bearer {KEY} extra",
        "Bearer ключ",
    ],
)
def test_wrong_bearer_key(locked, header):
    r = locked.post("/v1/detect/x", headers={"Authorization": header.encode("utf-8")})
    assert_401(r, "invalid API key")
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_empty_bearer_counts_as_no_credentials(locked):
    # faas-cli sends exactly this when it is not logged in.
    for header in ("Bearer", "Bearer ", "Bearer    "):
        assert_401(
            locked.post("/function/f", headers={"Authorization": header}), "needs an API key"
        )


def test_basic_auth_password_is_the_key(locked):
    # faas-cli login: user "admin", password = the key.
    for user in ("admin", "", "anyone"):
        r = locked.post("/function/f", headers={"Authorization": basic(user, KEY)})
        assert r.status_code == 200, (user, r.text)
    # A password containing ':' splits at the first one only.
    client = TestClient(make_app("a:b:c"))
    assert (
        client.get("/v1/models", headers={"Authorization": basic("u", "a:b:c")}).status_code == 200
    )


@pytest.mark.parametrize(
    ("header", "detail"),
    [
        (basic("admin", "wrong"), "invalid API key"),
        (basic(KEY, ""), "needs an API key"),  # the key as user name is not the password
        ("Basic " + base64.b64encode(KEY.encode()).decode(), "no ':'"),
        ("Basic !!!notbase64", "malformed Basic"),
        ("Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(), "malformed Basic"),
        (f"Token {KEY}", "unsupported Authorization scheme"),
        (KEY, "unsupported Authorization scheme"),
        (f"Digest username=x, response={KEY}", "unsupported Authorization scheme"),
    ],
)
def test_bad_basic_and_other_schemes(locked, header, detail):
    assert_401(locked.get("/v1/models", headers={"Authorization": header}), detail)


def test_two_authorization_headers_are_refused(locked):
    headers = [("Authorization", f"Bearer {KEY}"), ("Authorization", "Bearer x")]
    assert_401(locked.get("/v1/models", headers=headers), "more than one")


def test_refused_before_the_body_is_read(locked):
    # A big unauthenticated upload gets its 401 without the route ever running.
    assert_401(locked.post("/v1/detect/x", content=b"\0" * 2**20))


def test_no_key_means_open_and_the_header_is_ignored():
    client = TestClient(make_app(None))
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer junk"}).status_code == 200


def test_key_from_environment(monkeypatch):
    monkeypatch.setenv("VS_TEST_KEY", f"  {KEY}\n")  # a Secret made with echo ends in \n
    assert api_key("VS_TEST_KEY") == KEY
    monkeypatch.setenv("VS_TEST_KEY", "   ")
    assert api_key("VS_TEST_KEY") is None
    monkeypatch.delenv("VS_TEST_KEY")
    assert api_key("VS_TEST_KEY") is None


def test_configure_auth_reads_once(monkeypatch):
    saved = dict(auth._configured)
    try:
        monkeypatch.setenv("VS_TEST_KEY", KEY)
        assert configure_auth("VS_TEST_KEY") is True
        client = TestClient(make_app_configured())
        assert_401(client.get("/v1/models"))
        assert (
            client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        )
        # Changing the variable later changes nothing until the replica restarts.
        monkeypatch.setenv("VS_TEST_KEY", "other")
        assert (
            client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        )
        monkeypatch.delenv("VS_TEST_KEY")
        assert configure_auth("VS_TEST_KEY") is False
        assert client.get("/v1/models").status_code == 200
    finally:
        auth._configured.update(saved)


def make_app_configured() -> FastAPI:
    app = FastAPI()
    app.add_middleware(ApiKeyMiddleware)  # as serve_app/api.py does: the configured key

    @app.get("/v1/models")
    async def models() -> dict:
        return {"models": []}

    return app


def test_credentials_parser():
    assert credentials(None) is None
    assert credentials("Bearer") is None
    assert credentials(f"Bearer {KEY}") == KEY
    assert credentials(basic("u", KEY)) == KEY
    assert credentials("Basic") is None
    with pytest.raises(ValueError):
        credentials("Negotiate abc")


def test_websocket_without_key_is_closed():
    app = FastAPI()
    app.add_middleware(ApiKeyMiddleware, key_source=lambda: KEY)

    @app.websocket("/ws")
    async def ws(socket: WebSocket) -> None:
        await socket.accept()
        await socket.send_text("hi")
        await socket.close()

    client = TestClient(app)
    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/ws"):
        pass
    with client.websocket_connect("/ws", headers={"Authorization": f"Bearer {KEY}"}) as s:
        assert s.receive_text() == "hi"


# -- the real app -----------------------------------------------------------------------


def test_real_api_has_the_middleware():
    from serve_app.api import api

    assert any(m.cls is ApiKeyMiddleware for m in api.user_middleware)


def test_service_without_key_is_open(http, sample_url):
    """The session service runs with no key: every route answers without credentials."""
    assert http.get("/healthz").status_code == 200
    assert http.get("/v1/models").status_code == 200
    assert http.get("/openapi.json").status_code == 200
    r = http.post("/v1/detect/face-detect-pigo", json={"url": sample_url})
    assert r.status_code == 200, r.text
    # An Authorization header (faas-cli's empty Bearer, or junk) changes nothing.
    for header in ("Bearer", "Bearer junk", basic("admin", "x")):
        r = http.post(
            "/function/face-detect-pigo?format=json",
            content=sample_url.encode(),
            headers={"Authorization": header},
        )
        assert r.status_code == 200, (header, r.text)

"""Several API keys, the caller each one names, require_api_key and the startup log line."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from serve_app import auth
from serve_app.auth import (
    ApiKeyMiddleware,
    AuthConfigError,
    api_keys,
    caller_id,
    configure_auth,
    request_caller,
)


def make_app(keys) -> FastAPI:
    app = FastAPI()
    app.add_middleware(ApiKeyMiddleware, key_source=lambda: keys)

    @app.get("/whoami")
    async def whoami(request: Request) -> dict:
        return {"caller": request_caller(request.scope)}

    return app


def test_each_of_several_keys_is_valid_and_names_its_own_caller() -> None:
    client = TestClient(make_app(("key-one", "key-two")))
    one = client.get("/whoami", headers={"Authorization": "Bearer key-one"})
    two = client.get("/whoami", headers={"Authorization": "Bearer key-two"})
    assert one.status_code == two.status_code == 200
    assert one.json()["caller"] == caller_id("key-one") != two.json()["caller"]
    assert "key-one" not in one.text
    assert client.get("/whoami", headers={"Authorization": "Bearer key-three"}).status_code == 401
    assert client.get("/whoami").status_code == 401


def test_without_auth_there_is_no_caller() -> None:
    assert TestClient(make_app(None)).get("/whoami").json() == {"caller": None}


def test_keys_from_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("VS_K", " a-key , b-key,\n")
    assert api_keys("VS_K") == ("a-key", "b-key")
    monkeypatch.setenv("VS_K", " , ")
    assert api_keys("VS_K") is None


def test_startup_says_whether_auth_is_on_and_refuses_a_required_missing_key(
    monkeypatch, caplog
) -> None:
    saved = dict(auth._configured)
    try:
        monkeypatch.delenv("VS_K", raising=False)
        with caplog.at_level(logging.INFO, logger="ray.serve"):
            assert configure_auth("VS_K") is False
        assert "API key auth is OFF" in caplog.text
        with pytest.raises(AuthConfigError, match="require_api_key.*VS_K"):
            configure_auth("VS_K", required=True)
        monkeypatch.setenv("VS_K", "k1,k2")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ray.serve"):
            assert configure_auth("VS_K", required=True) is True
        assert "API key auth is ON: 2 key(s)" in caplog.text and "k1" not in caplog.text
    finally:
        auth._configured.update(saved)

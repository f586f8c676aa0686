"""HTTP calls to a visionserve service, with every failure turned into a `ClientError`.

The CLI's exit codes are decided here, in one place, so that flag mode and interactive mode
report the same failure the same way: 3 when nothing answers, 4 for the caller's mistakes
(4xx), 5 when the service fails or cannot serve the model (5xx, 503, a job past its time).
"""

from __future__ import annotations

import json
import mimetypes
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

EXIT_OK = 0
EXIT_LOCAL = 1  # the image could not be read or the output not written
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REJECTED = 4
EXIT_FAILED = 5

DEFAULT_URL = "http://127.0.0.1:8000"
CONNECT_TIMEOUT_S = 5.0
START_HINT = (
    "start it with `make run` in the visionserve checkout, "
    "or point --url / VISIONSERVE_URL at a running service"
)

ProgressCallback = Callable[[float, str], None]


class ClientError(Exception):
    """A failure to report to the user: `message` for stderr, `exit_code` for the shell."""

    def __init__(self, message: str, exit_code: int, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.status = status


@dataclass(frozen=True)
class ImageSource:
    """Where the image comes from: a local file (uploaded) or a URL (fetched by the service)."""

    path: Path | None = None
    url: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageSource:
        text = text.strip()
        if not text:
            raise ClientError("no image given: a local file path or an http(s) URL", EXIT_USAGE)
        if text.lower().startswith(("http://", "https://")):
            return cls(url=text)
        if "://" in text:
            raise ClientError(f"{text!r}: only http:// and https:// URLs are supported", EXIT_USAGE)
        path = Path(text).expanduser()
        if not path.is_file():
            raise ClientError(
                f"{text}: no such file (give a local image or an http(s) URL)", EXIT_USAGE
            )
        return cls(path=path)

    @property
    def stem(self) -> str:
        """A short name for default output files: the file's stem or the URL's last part."""
        if self.path is not None:
            return self.path.stem or "image"
        last = unquote(urlsplit(self.url or "").path.rstrip("/").rsplit("/", 1)[-1])
        return Path(last).stem or "image"

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else str(self.url)


@dataclass
class Answer:
    """One successful answer: JSON data or image bytes (with the X-Count header's value)."""

    content: bytes
    media_type: str
    count: int | None
    data: dict[str, Any] | None = None


def _form_value(value: Any) -> str:
    # Lists (SAM prompts) travel as JSON text; the service parses them back.
    if isinstance(value, (list, dict, bool)) or value is None:
        return json.dumps(value)
    return str(value)


class Service:
    """The visionserve HTTP API at `url`; use as a context manager."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            self._http = httpx.Client(
                base_url=self.url,
                headers=headers,
                timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
            )
        except (httpx.InvalidURL, ValueError) as err:
            raise ClientError(f"bad service URL {url!r}: {err}", EXIT_USAGE) from None

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    # -- API ---------------------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/models").json()["models"]

    def call(
        self, route: str, model: str, image: ImageSource, params: dict[str, Any], fmt: str
    ) -> Answer:
        """One direct call: `route` is "detect" or "segment"."""
        response = self._request(
            "POST", f"/v1/{route}/{model}", params={"format": fmt}, **self._body(image, params)
        )
        return _answer(response)

    def detect_batch(
        self, model: str, files: list[tuple[str, bytes]], params: dict[str, Any], fmt: str
    ) -> list[dict[str, Any]]:
        """One result (or per-image error) for each (name, bytes), in order: one request."""
        response = self._request(
            "POST",
            f"/v1/detect/{model}/batch",
            params={"format": fmt},
            files=[
                ("file", (name, data, mimetypes.guess_type(name)[0] or "application/octet-stream"))
                for name, data in files
            ],
            data={k: _form_value(v) for k, v in params.items()},
        )
        return response.json()["results"]

    def run_job(
        self,
        model: str,
        image: ImageSource,
        params: dict[str, Any],
        fmt: str,
        on_progress: ProgressCallback | None = None,
    ) -> Answer:
        """Submit a job, poll its status until done (reporting progress), fetch its result."""
        job = self._request(
            "POST", f"/v1/jobs/{model}", params={"format": fmt}, **self._body(image, params)
        ).json()
        deadline = time.monotonic() + self.timeout_s
        delay = 0.2
        while job["status"] not in ("done", "failed"):
            if on_progress:
                on_progress(float(job.get("progress") or 0.0), str(job.get("stage") or ""))
            if time.monotonic() > deadline:
                raise ClientError(
                    f"job {job['id']} not done after {self.timeout_s:g} s "
                    f"({job.get('progress', 0):.0%}, {job.get('stage')}); it keeps running: "
                    f"its result will be at {self.url}{job['result_url']}",
                    EXIT_FAILED,
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
            job = self._request("GET", job["status_url"]).json()
        if on_progress and job["status"] == "done":
            on_progress(1.0, "done")
        # A failed job's result URL answers the job's own error status and detail.
        return _answer(self._request("GET", job["result_url"]))

    # -- plumbing ----------------------------------------------------------------------
    @staticmethod
    def _body(image: ImageSource, params: dict[str, Any]) -> dict[str, Any]:
        if image.url is not None:
            return {"json": {"url": image.url, **params}}
        assert image.path is not None
        try:
            data = image.path.read_bytes()
        except OSError as err:
            raise ClientError(f"cannot read {image.path}: {err.strerror}", EXIT_LOCAL) from None
        mime = mimetypes.guess_type(image.path.name)[0] or "application/octet-stream"
        # Multipart keeps the file name (answers echo it) and avoids base64's 33 % overhead.
        return {
            "files": {"file": (image.path.name, data, mime)},
            "data": {k: _form_value(v) for k, v in params.items()},
        }

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectTimeout:
            raise ClientError(
                f"cannot reach the visionserve service at {self.url} (no answer within "
                f"{CONNECT_TIMEOUT_S:g} s): {START_HINT}",
                EXIT_UNREACHABLE,
            ) from None
        except httpx.TimeoutException:
            raise ClientError(
                f"the service at {self.url} did not answer {method} {path} within "
                f"{self.timeout_s:g} s (raise --timeout for big images or slow models)",
                EXIT_FAILED,
            ) from None
        except httpx.ConnectError as err:
            reason = "connection refused" if "refused" in str(err).lower() else str(err)
            raise ClientError(
                f"cannot reach the visionserve service at {self.url} ({reason}): {START_HINT}",
                EXIT_UNREACHABLE,
            ) from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as err:
            raise ClientError(f"bad service URL {self.url!r}: {err}", EXIT_USAGE) from None
        except httpx.TransportError as err:
            raise ClientError(
                f"lost the connection to {self.url} during {method} {path}: "
                f"{type(err).__name__}: {err}",
                EXIT_UNREACHABLE,
            ) from None
        if response.status_code >= 400:
            raise _http_error(response)
        return response


def _answer(response: httpx.Response) -> Answer:
    media_type = response.headers.get("content-type", "").split(";")[0].strip()
    count_text = response.headers.get("x-count", "")
    count = int(count_text) if count_text.isdigit() else None
    data = response.json() if media_type == "application/json" else None
    if data is not None and count is None and isinstance(data.get("count"), int):
        count = data["count"]
    return Answer(response.content, media_type, count, data)


def _http_error(response: httpx.Response) -> ClientError:
    status = response.status_code
    try:
        body = response.json()
        code, detail = body.get("error", "error"), body.get("detail", "")
    except (ValueError, AttributeError):
        code, detail = response.reason_phrase or "error", response.text.strip()[:500]
    message = f"the service answered {status} {code}: {detail}".rstrip(": ")
    if status in (401, 403):
        message += " (give an API key with --api-key or VISIONSERVE_API_KEY)"
    exit_code = EXIT_REJECTED if status < 500 else EXIT_FAILED
    return ClientError(message, exit_code, status)

"""A model's plain-data result as the HTTP answer (the last step of the data path)."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, PlainTextResponse, Response


def answer(result: dict[str, Any], output: str) -> Response:
    """The image (`image` + `media_type`), base64 text (`image_base64`) or the JSON itself."""
    headers = {"X-Count": str(result.get("count", ""))}
    if "image" in result:
        return Response(result["image"], media_type=result["media_type"], headers=headers)
    if output == "base64":
        return PlainTextResponse(result["image_base64"], headers=headers)
    return JSONResponse(result)

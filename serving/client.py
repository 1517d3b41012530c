"""The HTTP client behind `aipd predict`: local files in, one verdict (or one error) per file out.

It speaks only the public HTTP API, like any other client of the service; one file goes to `/predict`, several go
to `/predict/batch` in chunks of the server's per-request limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from app.errors import UserError

# Refusals about the caller or the service, not about a file: reported once, not as a row per file.
_WHOLE_REQUEST = (401, 429, 503)


class ServiceError(UserError, RuntimeError):
    """The service cannot be reached, or refused the whole request; the message says which and why."""


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


def _refusal(response: httpx.Response) -> tuple[str, str]:
    try:
        body = response.json()
        return str(body.get("error", response.status_code)), str(body.get("detail", response.text))
    except ValueError:
        return str(response.status_code), response.text[:200]


def predict_files(
    url: str,
    paths: list[Path],
    *,
    api_key: str | None = None,
    timeout_s: float = 60.0,
    chunk: int = 32,
) -> list[dict[str, Any]]:
    """One dict per path, in order: the prediction fields, or `error` and `detail`; `file` names the path."""
    base = url.rstrip("/")
    results: list[dict[str, Any]] = []
    try:
        with httpx.Client(timeout=timeout_s, headers=_headers(api_key)) as client:
            if len(paths) == 1:
                results.append(_one(client, base, paths[0]))
            else:
                for start in range(0, len(paths), chunk):
                    results.extend(_many(client, base, paths[start : start + chunk]))
    except httpx.TransportError as err:
        raise ServiceError(f"cannot reach the service at {base}: {err}; start it with `aipd serve`") from err
    return results


def _one(client: httpx.Client, base: str, path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as err:
        return {"file": str(path), "error": "unreadable", "detail": str(err)}
    response = client.post(f"{base}/predict", files={"file": (path.name, data)})
    if response.status_code == 200:
        return {"file": str(path), **response.json()}
    error, detail = _refusal(response)
    if response.status_code in _WHOLE_REQUEST:
        raise ServiceError(f"{error}: {detail}")
    return {"file": str(path), "error": error, "detail": detail}


def _many(client: httpx.Client, base: str, paths: list[Path]) -> list[dict[str, Any]]:
    readable: list[Path] = []
    out: dict[Path, dict[str, Any]] = {}
    parts = []
    for path in paths:
        try:
            parts.append(("files", (path.name, path.read_bytes())))
            readable.append(path)
        except OSError as err:
            out[path] = {"file": str(path), "error": "unreadable", "detail": str(err)}
    if parts:
        response = client.post(f"{base}/predict/batch", files=parts)
        if response.status_code == 200:
            for path, item in zip(readable, response.json()["results"], strict=False):
                out[path] = {"file": str(path), **{k: v for k, v in item.items() if v is not None and k != "filename"}}
        else:
            error, detail = _refusal(response)
            if response.status_code in _WHOLE_REQUEST:
                raise ServiceError(f"{error}: {detail}")
            for path in readable:
                out[path] = {"file": str(path), "error": error, "detail": detail}
    return [out[path] for path in paths]

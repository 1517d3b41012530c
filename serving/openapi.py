"""The service's OpenAPI document: what each route can answer, and the upload constraints a deployment enforces.

FastAPI derives the routes and bodies from the handlers; what it cannot see is added here: the refusals every upload
route shares (in the one error shape, with `Retry-After` where it applies), the multipart bodies with this
deployment's byte, pixel and file-count limits, and the API-key scheme when keys are configured. A property-based
run of the document against the service (tests/serving/test_schema.py) holds the two to each other.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI

from app.config import Settings
from app.contract import API_KEY_HEADER, RETRY_AFTER_HEADER, ErrorResponse, HealthResponse

ROUTE_PREFIXES = ("", "/v1")  # every route at the root and as its /v1 twin, like the original service
UPLOADS = {"/predict": "file", "/predict/explain": "file", "/predict/batch": "files"}
API_KEY_SCHEME = "ApiKeyHeader"
ACCEPTED_TYPES = "image/jpeg, image/png, image/webp"

_ERROR_TEXT = {
    400: "not an image, truncated or corrupt, or a malformed upload",
    401: f"missing or wrong {API_KEY_HEADER} (when keys are configured)",
    413: "file or request too large, too many files, or too many pixels",
    415: "an image type other than JPEG, PNG or WebP, or not a multipart upload",
    422: "Grad-CAM is not available for this model",
    429: "rate limited; see Retry-After",
    500: "the model failed on this request",
    503: "the model is loading or unavailable, or the metrics store is restarting; see Retry-After",
}
RETRY_AFTER_DOC = {RETRY_AFTER_HEADER: {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these refusals, all in the one error shape."""
    return {
        code: {
            "model": ErrorResponse,
            "description": _ERROR_TEXT[code],
            **({"headers": RETRY_AFTER_DOC} if code in (429, 503) else {}),
        }
        for code in codes
    }


UPLOAD_ERRORS = errors(400, 401, 413, 415, 429, 500, 503)
# /health and /readyz answer their own body when not ready, not the error shape
HEALTH_NOT_READY = {503: {"model": HealthResponse, "description": "not ready", "headers": RETRY_AFTER_DOC}}


def upload_body(field: str, settings: Settings) -> dict[str, Any]:
    """The multipart request body of an upload route, with this deployment's limits.

    A single-file route refuses an empty or oversize file (400, 413); a batch answers such a file alone, inside its
    200, so only the number of files is a limit of the request there.
    """
    limits = settings.images
    what = (
        f"JPEG, PNG or WebP, up to {limits.max_bytes:,} bytes and {limits.max_pixels:,} pixels; the type is read "
        "from the bytes, not from the file name or the part's Content-Type"
    )
    schema: dict[str, Any]
    if field == "file":
        schema = {
            "type": "string",
            "format": "binary",
            "minLength": 1,
            "maxLength": limits.max_bytes,
            "description": what,
        }
    else:
        schema = {
            "type": "array",
            "minItems": 1,
            "maxItems": settings.serve.max_batch_files,
            "items": {"type": "string", "format": "binary"},
            "description": f"{what}; a file that breaks these limits gets its error in its own result",
        }
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": [field], "properties": {field: schema}},
                "encoding": {field: {"contentType": ACCEPTED_TYPES}},
            }
        },
    }


def openapi_document(api: FastAPI, settings: Settings) -> dict[str, Any]:
    """FastAPI's document of the app's routes, with this deployment's upload limits and, when keys are on, the key
    header."""
    document = copy.deepcopy(FastAPI.openapi(api))
    if settings.api_keys:
        schemes = document.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes[API_KEY_SCHEME] = {"type": "apiKey", "in": "header", "name": API_KEY_HEADER}
    for path, field in UPLOADS.items():
        for prefix in ROUTE_PREFIXES:
            operation = document["paths"][prefix + path]["post"]
            operation["requestBody"] = upload_body(field, settings)
            if settings.api_keys:
                operation["security"] = [{API_KEY_SCHEME: []}]
    return document


def served_openapi() -> dict[str, Any]:
    """What /openapi.json answers: the document the answering replica made for its own settings.

    Serve runs a pickled copy of the ingress's app, made when the class was decorated, so a replica cannot reach the
    app it serves from its constructor; this function, set on the app before the copy, asks the replica instead.
    """
    from ray import serve

    return serve.get_replica_context().servable_object.openapi_schema

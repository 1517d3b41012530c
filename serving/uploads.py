"""Reading multipart uploads as a stream, with the byte limits enforced while the bytes arrive.

Starlette's `request.form()` hands the whole body to python-multipart, which spools every file part to a temporary
file of any size before the route sees it: a 1 GB upload would be read, stored and only then refused. Here the
declared Content-Length is checked before reading anything, the body is fed to python-multipart's streaming parser
chunk by chunk, and reading stops at the first byte over a limit, so memory per request stays bounded by the limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.contract import ApiError

# Room for the multipart framing around the file bytes (boundaries, part headers, a few small text fields).
MULTIPART_OVERHEAD = 64 * 1024


@dataclass
class UploadedFile:
    field: str
    filename: str | None
    content_type: str | None
    data: bytes = b""
    too_large: bool = False  # the part passed the per-file limit; its bytes were dropped while reading


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    filename: str | None = None
    content_type: str | None = None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    wanted: bool = False
    too_large: bool = False


def body_limit(max_file_bytes: int, max_files: int) -> int:
    return max_file_bytes * max_files + MULTIPART_OVERHEAD * max_files


async def read_files(
    headers: dict[str, str],
    stream: AsyncIterator[bytes],
    *,
    field_name: str,
    max_files: int,
    max_file_bytes: int,
    fail_fast: bool,
) -> list[UploadedFile]:
    """The file parts named `field_name`, in order.

    `fail_fast` (single-image routes) refuses the request at the first file over `max_file_bytes`; otherwise
    (batch) such a file is kept as a `too_large` entry without its bytes, so it fails alone.
    """
    content_type = headers.get("content-type", "")
    mime, params = parse_options_header(content_type)
    if mime != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the image as multipart/form-data in the field {field_name!r} (got Content-Type "
            f"{content_type or 'none'!r}), e.g. curl -F {field_name}=@photo.jpg",
        )
    limit = body_limit(max_file_bytes, max_files)
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit, max_file_bytes, max_files)

    files: list[UploadedFile] = []
    current = _Part()
    header_field: list[bytes] = []
    header_value: list[bytes] = []
    finished = False

    def on_part_begin() -> None:
        nonlocal current
        current = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.append(data[start:end])

    def on_header_end() -> None:
        name = b"".join(header_field).decode("latin-1").strip().lower()
        current.headers[name] = b"".join(header_value).decode("latin-1").strip()
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(current.headers.get("content-disposition", ""))
        name = disposition.get(b"name")
        filename = disposition.get(b"filename")
        current.name = name.decode("utf-8", "replace") if name is not None else None
        current.filename = filename.decode("utf-8", "replace") if filename is not None else None
        current.content_type = current.headers.get("content-type")
        current.wanted = current.name == field_name
        if current.wanted and len(files) >= max_files:
            raise ApiError(413, "too_many_files", f"at most {max_files} files per request in the field {field_name!r}")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if not current.wanted:
            return
        current.size += end - start
        if current.size > max_file_bytes:
            if fail_fast:
                raise ApiError(
                    413,
                    "too_large",
                    f"the file has more than {max_file_bytes:,} bytes; the limit is {max_file_bytes:,}",
                )
            current.too_large = True
            current.chunks.clear()
            return
        current.chunks.append(data[start:end])

    def on_part_end() -> None:
        if current.wanted:
            files.append(
                UploadedFile(
                    field=field_name,
                    filename=current.filename,
                    content_type=current.content_type,
                    data=b"".join(current.chunks),
                    too_large=current.too_large,
                )
            )

    def on_end() -> None:
        nonlocal finished
        finished = True

    parser = MultipartParser(
        params[b"boundary"],
        callbacks={
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > limit:
            raise _too_large(received, limit, max_file_bytes, max_files, more=True)
        try:
            parser.write(chunk)
        except ApiError:
            raise
        except (FormParserError, ValueError) as err:
            raise ApiError(400, "bad_multipart", f"the multipart body cannot be parsed: {err}") from err
        if finished:
            break
    if not finished:
        raise ApiError(400, "bad_multipart", "the multipart body ends before its closing boundary")
    if not files:
        raise ApiError(
            400, "missing_file", f"no file in the field {field_name!r}; e.g. curl -F {field_name}=@photo.jpg"
        )
    return files


def _too_large(size: int, limit: int, max_file_bytes: int, max_files: int, more: bool = False) -> ApiError:
    files = "one file" if max_files == 1 else f"{max_files} files"
    amount = f"more than {limit:,}" if more else f"{size:,}"
    return ApiError(
        413,
        "too_large",
        f"the request body has {amount} bytes; the limit is {max_file_bytes:,} bytes per file ({files} per request)",
    )

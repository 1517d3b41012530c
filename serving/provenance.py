"""Provenance evidence for one uploaded photo, reported beside the detector's score, never instead of it.

A moderator asks two questions the pixels cannot answer: does the file carry Content Credentials (a C2PA manifest)
that still match the file, and failing that, what does its unsigned metadata (IPTC/XMP DigitalSourceType, EXIF
make/model/software) claim. The two are kept apart on purpose: a manifest's claim is bound to the bytes by a
signature, while anybody can write any XMP or EXIF with a text editor, so unsigned metadata is a hint and never
decides alone.

Upload bytes are hostile input: nothing here raises for them. A broken, truncated or forged manifest is an answer
(`c2pa.state`, `c2pa.error`), not an exception; reading is bounded in size and time; pixels are never decoded; and the
C2PA reader is told never to go on the network (a file may name a remote manifest URL, and fetching it for an
anonymous upload would let any uploader make this service send requests where they like).
"""

from __future__ import annotations

import html
import io
import json
import re
import threading
from typing import Any

from app.contract import C2paEvidence, Provenance, UnsignedMetadata

DEFAULT_MAX_BYTES = 10 * 1024 * 1024  # the ingress takes no larger upload (serve_config images.max_bytes)
DEFAULT_TIMEOUT_S = 2.0  # a well-formed manifest reads in about a millisecond; seconds mean something is wrong

# The IPTC digital source types that say "made by a generative model" (cv.iptc.org/newscodes/digitalsourcetype).
GENERATIVE_SOURCE_TYPES = frozenset(
    {"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia", "algorithmicMedia"}
)


# The description box that opens every C2PA manifest store (JUMBF type UUID 63327061-0011-0010-8000-00AA00389B71,
# label "c2pa"), the same bytes in JPEG APP11, PNG caBX and WebP C2PA chunks: how a read that failed can still say
# whether a manifest was there.
_MANIFEST_STORE_MARKER = b"jumdc2pa\x00\x11\x00\x10\x80\x00\x00\xaa\x00\x38\x9b\x71"

# A manifest kept elsewhere is named by XMP's dcterms:provenance (the C2PA specification's remote manifest reference).
_REMOTE_REFERENCE = b"provenance"

# Never fetch: a remote manifest URL or an OCSP responder in an upload is the uploader's choice of address.
_READER_SETTINGS: dict[str, Any] = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}

_XMP_APP1_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
_EXIF_APP1_PREFIX = b"Exif\x00\x00"
_MAX_XMP_SCANNED = 256 * 1024
_MAX_TEXT = 256  # every string in the answer came from the uploader; a JSON answer does not echo a megabyte of it
_MAX_LIST = 32
_MAX_JPEG_SEGMENTS = 512

# XMP writes a property as an attribute, as element text, or as an rdf:resource; the prefix is the writer's choice.
# The bounded repeats keep a hostile packet linear to scan (no XML parser: no entity expansion on upload bytes).
_XMP_PATTERNS = {
    name: (
        re.compile(rf'[\s:]{name}\s*=\s*(?:"([^"<>]{{1,2048}})"|\'([^\'<>]{{1,2048}})\')'),
        re.compile(rf"<(?:[\w.-]{{1,64}}:)?{name}\b[^>]{{0,512}}?\brdf:resource\s*=\s*[\"']([^\"'<>]{{1,2048}})[\"']"),
        re.compile(rf"<(?:[\w.-]{{1,64}}:)?{name}\b[^>/]{{0,512}}>\s*(?:<rdf:\w+>\s*)?([^<\s][^<]{{0,2047}})<"),
    )
    for name in ("DigitalSourceType", "CreatorTool")
}


def read_provenance(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    trust_anchors_pem: str | None = None,
) -> Provenance:
    """The provenance evidence of one upload; never raises for what the bytes contain.

    Only JPEG, PNG and WebP are looked at (by magic bytes, as the ingress takes no other type); any other bytes give an
    empty answer with `c2pa.state == "absent"`. Above `max_bytes` the C2PA manifest is not verified (hashing the
    whole file is the costly part) and `c2pa.state` is `"too_large"`; unsigned metadata is still read, as it sits in
    the headers.

    The C2PA read runs in a daemon thread joined for `timeout_s`; past it the answer is `c2pa.state == "timeout"`.
    A Python thread cannot be killed, so a read that runs long keeps its thread and a CPU until the native reader
    returns on its own: the timeout bounds the caller's wait, and `max_bytes` is what bounds the work.

    `trust_anchors_pem` is a PEM bundle of root certificates whose manifests count as `trusted`; without it nothing
    is trusted (c2pa-python 0.38.1's default settings hold no anchors): `c2pa.trusted` is False for every signer.

    Raises:
        ValueError: `trust_anchors_pem` is not a PEM bundle c2pa accepts (configuration, not upload, input).
    """
    media_type = _sniff_media_type(data)
    if media_type is None:
        return Provenance()
    metadata = _read_unsigned_metadata(data, media_type)
    if len(data) > max_bytes:
        c2pa_evidence = C2paEvidence(
            present=_MANIFEST_STORE_MARKER in data,
            state="too_large",
            error=f"not verified: the file has {len(data):,} bytes, more than the limit of {max_bytes:,}",
        )
    elif _MANIFEST_STORE_MARKER not in data and _REMOTE_REFERENCE not in data:
        c2pa_evidence = C2paEvidence()  # nothing for the reader to find; most photos, so they skip its thread
    else:
        c2pa_evidence = _read_c2pa_bounded(data, media_type, timeout_s, trust_anchors_pem)
    return _conclude(media_type, c2pa_evidence, metadata)


def _conclude(media_type: str, evidence: C2paEvidence, metadata: UnsignedMetadata) -> Provenance:
    """Only a manifest that verifies declares; everything else that says "generative" is a hint."""
    signed_says = evidence.digital_source_type in GENERATIVE_SOURCE_TYPES
    ai_declared = signed_says and evidence.valid is True
    unverified_says = (signed_says and not ai_declared) or metadata.digital_source_type in GENERATIVE_SOURCE_TYPES
    return Provenance(
        media_type=media_type,
        c2pa=evidence,
        metadata=metadata,
        ai_declared=ai_declared,
        ai_hinted_unsigned=unverified_says and not ai_declared,
    )


def _sniff_media_type(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


# ---------------------------------------------------------------------------------------------------------------- C2PA


def _read_c2pa_bounded(data: bytes, media_type: str, timeout_s: float, trust_anchors_pem: str | None) -> C2paEvidence:
    """Run the native read in a thread so a pathological manifest costs the caller `timeout_s`, not its request."""
    try:
        import c2pa
    except ImportError as err:
        return C2paEvidence(present=_MANIFEST_STORE_MARKER in data, state="unavailable", error=f"c2pa-python: {err}")
    settings: dict[str, Any] = dict(_READER_SETTINGS)
    if trust_anchors_pem is not None:
        settings["trust"] = {"user_anchors": trust_anchors_pem}
    try:
        context = c2pa.Context.from_dict(settings)
    except c2pa.C2paError as err:
        raise ValueError(f"trust_anchors_pem is not a certificate bundle c2pa accepts: {err}") from err

    answer: list[C2paEvidence] = []

    def work() -> None:
        try:
            answer.append(_read_c2pa(c2pa, context, data, media_type))
        finally:
            context.close()

    worker = threading.Thread(target=work, name="c2pa-read", daemon=True)
    worker.start()
    worker.join(max(0.0, timeout_s))
    if answer:
        return answer[0]
    present = _MANIFEST_STORE_MARKER in data
    if worker.is_alive():
        error = f"the C2PA read took more than {timeout_s:g} s and was abandoned"
        return C2paEvidence(present=present, state="timeout", error=error)
    return C2paEvidence(present=present, state="unreadable", valid=False if present else None, error="the read died")


def _read_c2pa(c2pa: Any, context: Any, data: bytes, media_type: str) -> C2paEvidence:
    """One native read, every outcome mapped to an answer: this runs on upload bytes and may not raise."""
    try:
        with c2pa.Reader(media_type, io.BytesIO(data), context=context) as reader:
            store = json.loads(reader.json())
    except c2pa.C2paError.ManifestNotFound:
        return C2paEvidence()
    except Exception as err:  # noqa: BLE001 - a broken manifest is an answer, whatever the reader raised
        return _read_failure(data, err)
    try:
        return _evidence_from_store(store)
    except Exception as err:  # noqa: BLE001 - a store of an unexpected shape is unreadable, not a 500
        return C2paEvidence(present=True, state="unreadable", valid=False, error=_text(f"unexpected manifest: {err}"))


def _read_failure(data: bytes, err: Exception) -> C2paEvidence:
    """Told apart by the bytes: a broken manifest is "unreadable", a file c2pa merely failed to parse is "absent"."""
    message = _text(str(err) or type(err).__name__)
    if message.startswith("Remote"):  # the file names a manifest URL, deliberately not fetched
        return C2paEvidence(present=True, state="remote", error=message)
    if _MANIFEST_STORE_MARKER in data:
        return C2paEvidence(present=True, state="unreadable", valid=False, error=message)
    return C2paEvidence(error=message)


def _evidence_from_store(store: dict[str, Any]) -> C2paEvidence:
    manifests = store.get("manifests") or {}
    active = manifests.get(store.get("active_manifest")) or {}
    results = (store.get("validation_results") or {}).get("activeManifest") or {}
    failures = _codes(results.get("failure")) + _codes(store.get("validation_status"))
    successes = _codes(results.get("success"))
    errors = list(dict.fromkeys(failures))[:_MAX_LIST]
    if not active:
        return C2paEvidence(present=True, state="unreadable", valid=False, errors=errors, error="no active manifest")

    state = store.get("validation_state")  # c2pa-rs: "Invalid", "Valid" (integrity holds) or "Trusted"
    if state in ("Valid", "Trusted"):
        valid = True
    elif state == "Invalid":
        valid = False
    else:  # an older reader without the summary: integrity holds when nothing but trust failed
        valid = not [code for code in errors if not code.startswith("signingCredential.")]
    if state == "Trusted" or "signingCredential.trusted" in successes:
        trusted: bool | None = True
    elif "signingCredential.untrusted" in errors:
        trusted = False
    else:
        trusted = None

    actions, source_type = _actions(active.get("assertions") or [])
    signature = active.get("signature_info") or {}
    return C2paEvidence(
        present=True,
        state="valid" if valid else "invalid",
        valid=valid,
        trusted=trusted,
        claim_generator=_claim_generator(active),
        actions=actions,
        digital_source_type=source_type,
        signer=_text(signature.get("issuer") or signature.get("common_name")),
        errors=errors,
    )


def _codes(entries: Any) -> list[str]:
    return [_text(entry["code"]) for entry in entries or [] if isinstance(entry, dict) and entry.get("code")]


def _claim_generator(manifest: dict[str, Any]) -> str | None:
    """v1 claims name the generator in a string, v2 claims in `claim_generator_info` (a list, or one object)."""
    if manifest.get("claim_generator"):
        return _text(manifest["claim_generator"])
    info = manifest.get("claim_generator_info")
    if isinstance(info, list):
        info = info[0] if info else None
    if not isinstance(info, dict) or not info.get("name"):
        return None
    return _text(f"{info['name']}/{info['version']}" if info.get("version") else info["name"])


def _actions(assertions: list[Any]) -> tuple[list[str], str | None]:
    """The action names, and the source type of the action that made the asset (created/opened), else of any action:
    a generative edit (e.g. generative fill) states its source type on a `c2pa.edited`/`c2pa.placed` action."""
    names: list[str] = []
    creating: str | None = None
    any_source: str | None = None
    for assertion in assertions:
        if not isinstance(assertion, dict) or assertion.get("label") not in ("c2pa.actions", "c2pa.actions.v2"):
            continue
        for action in (assertion.get("data") or {}).get("actions") or []:
            if not isinstance(action, dict) or not isinstance(action.get("action"), str):
                continue
            names.append(_text(action["action"]))
            source = _short_term(action.get("digitalSourceType"))
            if source and action["action"] in ("c2pa.created", "c2pa.opened") and creating is None:
                creating = source
            any_source = any_source or source
    return list(dict.fromkeys(names))[:_MAX_LIST], creating or any_source


# ------------------------------------------------------------------------------------------------- unsigned metadata


def _read_unsigned_metadata(data: bytes, media_type: str) -> UnsignedMetadata:
    """EXIF and XMP from the headers only: nothing here decodes a pixel, and nothing here may raise."""
    exif_raw, xmp = _jpeg_exif_and_xmp(data) if media_type == "image/jpeg" else _pillow_exif_and_xmp(data)
    make, model, software = _exif_fields(exif_raw)
    xmp_text = xmp[:_MAX_XMP_SCANNED].decode("utf-8", errors="replace") if xmp else ""
    return UnsignedMetadata(
        digital_source_type=_short_term(_xmp_value(xmp_text, "DigitalSourceType")),
        make=make,
        model=model,
        software=software or _text(_xmp_value(xmp_text, "CreatorTool")),
    )


def _jpeg_exif_and_xmp(data: bytes) -> tuple[bytes | None, bytes | None]:
    """Walk the JPEG marker segments up to the scan (no Pillow: a truncated file still gives its headers)."""
    exif = xmp = None
    pos = 2
    for _ in range(_MAX_JPEG_SEGMENTS):
        if pos + 4 > len(data) or data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan, end of image: no more metadata segments
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        payload = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and exif is None and payload.startswith(_EXIF_APP1_PREFIX):
            exif = payload
        elif marker == 0xE1 and xmp is None and payload.startswith(_XMP_APP1_PREFIX):
            xmp = payload[len(_XMP_APP1_PREFIX) :]
        pos += 2 + max(length, 2)
    return exif, xmp


def _pillow_exif_and_xmp(data: bytes) -> tuple[bytes | None, bytes | None]:
    """PNG eXIf/iTXt and WebP EXIF/XMP chunks as Pillow's header parse finds them; `Image.open` decodes no pixel."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "WEBP"]) as image:
            exif, xmp = image.info.get("exif"), image.info.get("xmp")
    except Exception:  # noqa: BLE001 - unreadable headers just mean no unsigned metadata
        return None, None
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8", errors="replace")
    return (exif if isinstance(exif, bytes) else None), (xmp if isinstance(xmp, bytes) else None)


def _exif_fields(raw: bytes | None) -> tuple[str | None, str | None, str | None]:
    """Make (0x010F), Model (0x0110), Software (0x0131) of IFD0, parsed by Pillow from the bytes alone.

    Not `image.getexif()`: on a PNG whose eXIf chunk it has not met yet, Pillow decodes the whole image to look for it.
    """
    if not raw:
        return None, None, None
    from PIL import Image

    try:
        exif = Image.Exif()
        exif.load(raw)
        return _text(exif.get(0x010F)), _text(exif.get(0x0110)), _text(exif.get(0x0131))
    except Exception:  # noqa: BLE001 - a broken EXIF block is no EXIF
        return None, None, None


def _xmp_value(xmp: str, name: str) -> str | None:
    for pattern in _XMP_PATTERNS[name]:
        match = pattern.search(xmp)
        if match:
            value = next(group for group in match.groups() if group is not None)
            return html.unescape(value).strip() or None
    return None


def _short_term(value: Any) -> str | None:
    """IPTC terms are URIs (http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia): keep the term."""
    if not isinstance(value, str) or not value.strip():
        return None
    return _text(value.strip().rstrip("/").rsplit("/", 1)[-1])


def _text(value: Any) -> str | None:
    """An uploader's string fit for a JSON answer: decoded, without control characters, and short."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = "".join(ch for ch in str(value) if ch.isprintable()).strip()
    return text[:_MAX_TEXT] or None

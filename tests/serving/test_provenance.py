"""serving.provenance on files made here: JPEGs signed with C2PA by a CA and signer certificate minted in the test,
the same files tampered with, cut and filled with garbage, and files with only unsigned XMP or EXIF."""

from __future__ import annotations

import datetime
import io
import json
import random
import socket
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from serving import provenance
from serving.provenance import read_provenance

AI_SOURCE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
MANIFEST = {
    "claim_generator_info": [{"name": "aipd-test", "version": "1.0"}],
    "title": "product.jpg",
    "assertions": [
        {"label": "c2pa.actions", "data": {"actions": [{"action": "c2pa.created", "digitalSourceType": AI_SOURCE}]}}
    ],
}


@dataclass(frozen=True)
class Signed:
    jpeg: bytes  # signed, untouched
    chain_pem: bytes
    key_pem: bytes
    ca_pem: str


def _photo(seed: int = 0, *, fmt: str = "JPEG", **save: object) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **save)
    return out.getvalue()


def _certificates() -> tuple[bytes, bytes, str]:
    """(signer + CA chain, signer key, CA) in PEM: an ES256 CA and an end-entity signer with what C2PA asks of one
    (digitalSignature, an accepted extended key usage, not a CA, key identifiers)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AIPD Test"),
            ]
        )

    def usage(*, signer: bool) -> x509.KeyUsage:
        flags = dict.fromkeys(
            ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement", "encipher_only"), False
        )
        return x509.KeyUsage(
            digital_signature=signer, key_cert_sign=not signer, crl_sign=not signer, decipher_only=False, **flags
        )

    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    ca_key, signer_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("AIPD Test Root CA"))
        .issuer_name(name("AIPD Test Root CA"))
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage(signer=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    signer = (
        x509.CertificateBuilder()
        .subject_name(name("AIPD Test Signer"))
        .issuer_name(ca.subject)
        .public_key(signer_key.public_key())
        .serial_number(2)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(signer=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(signer_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key = signer_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return signer.public_bytes(pem) + ca.public_bytes(pem), key, ca.public_bytes(pem).decode()


def _sign(photo: bytes, media_type: str, chain_pem: bytes, key_pem: bytes) -> bytes:
    import c2pa

    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain_pem, key_pem, None))
    out = io.BytesIO()
    with (
        c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}}) as context,
        c2pa.Builder(MANIFEST, context=context) as builder,
    ):
        builder.sign(signer, media_type, io.BytesIO(photo), out)
    signer.close()
    return out.getvalue()


@pytest.fixture(scope="module")
def signed() -> Signed:
    pytest.importorskip("cryptography")
    pytest.importorskip("c2pa")
    chain, key, ca = _certificates()
    return Signed(_sign(_photo(), "image/jpeg", chain, key), chain, key, ca)


def _segments(jpeg: bytes) -> list[tuple[int, int, int]]:
    """(offset, marker, length) of each marker segment before the scan, and the scan's own offset last."""
    found, pos = [], 2
    while jpeg[pos + 1] != 0xDA:
        length = int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
        found.append((pos, jpeg[pos + 1], length))
        pos += 2 + length
    found.append((pos, 0xDA, 0))
    return found


def _with_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    return jpeg[:2] + bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def _replace_manifest(jpeg: bytes, make_payload) -> bytes:
    """The signed JPEG with its (single) APP11 manifest segment's payload replaced by make_payload(payload)."""
    pos, _, length = next(segment for segment in _segments(jpeg) if segment[1] == 0xEB)
    payload = make_payload(jpeg[pos + 4 : pos + 2 + length])
    return jpeg[:pos] + b"\xff\xeb" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[pos + 2 + length :]


def _xmp(properties: str) -> bytes:
    packet = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'{properties}</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    )
    return b"http://ns.adobe.com/xap/1.0/\x00" + packet.encode()


IPTC = 'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'


def test_a_signed_untouched_photo_is_valid_and_declares_ai_but_its_self_made_signer_is_untrusted(signed: Signed):
    answer = read_provenance(signed.jpeg)

    assert answer.media_type == "image/jpeg"
    c2pa = answer.c2pa
    assert (c2pa.present, c2pa.state, c2pa.valid, c2pa.trusted) == (True, "valid", True, False)
    assert c2pa.claim_generator == "aipd-test/1.0"
    assert c2pa.actions == ["c2pa.created"]
    assert c2pa.digital_source_type == "trainedAlgorithmicMedia"
    assert c2pa.signer == "AIPD Test"
    assert c2pa.errors == ["signingCredential.untrusted"]  # integrity holds; only the signer is unknown
    assert c2pa.error is None
    assert (answer.ai_declared, answer.ai_hinted_unsigned) == (True, False)
    body = json.loads(answer.model_dump_json())  # goes into an HTTP answer as it is
    assert body["c2pa"]["state"] == "valid" and body["metadata"]["signed"] is False and body["ai_declared"] is True


def test_the_signer_is_trusted_when_its_ca_is_a_trust_anchor(signed: Signed):
    c2pa = read_provenance(signed.jpeg, trust_anchors_pem=signed.ca_pem).c2pa

    assert (c2pa.state, c2pa.valid, c2pa.trusted, c2pa.errors) == ("valid", True, True, [])


@pytest.mark.parametrize(("fmt", "media_type"), [("PNG", "image/png"), ("WEBP", "image/webp")])
def test_signed_png_and_webp_are_read_as_what_they_are(signed: Signed, fmt: str, media_type: str):
    answer = read_provenance(_sign(_photo(9, fmt=fmt), media_type, signed.chain_pem, signed.key_pem))

    assert answer.media_type == media_type
    assert (answer.c2pa.state, answer.c2pa.valid, answer.c2pa.digital_source_type) == (
        "valid",
        True,
        "trainedAlgorithmicMedia",
    )
    assert answer.ai_declared is True


def test_a_trust_anchor_that_is_no_certificate_is_a_configuration_error(signed: Signed):
    with pytest.raises(ValueError, match="trust_anchors_pem"):
        read_provenance(signed.jpeg, trust_anchors_pem="not a certificate")


def _edited(jpeg: bytes) -> bytes:
    """The file with one pixel's coefficient bit flipped: no marker appears, the JPEG still parses."""
    tampered = bytearray(jpeg)
    scan = _segments(jpeg)[-1][0] + 200  # inside the entropy-coded data, past the scan header
    at = next(
        i for i in range(scan, len(tampered)) if tampered[i] not in (0x00, 0xFE, 0xFF) and tampered[i - 1] != 0xFF
    )
    tampered[at] ^= 0x01
    return bytes(tampered)


def test_a_photo_edited_after_signing_is_invalid_and_its_claim_only_a_hint(signed: Signed):
    answer = read_provenance(_edited(signed.jpeg))

    assert (answer.c2pa.present, answer.c2pa.state, answer.c2pa.valid) == (True, "invalid", False)
    assert "assertion.dataHash.mismatch" in answer.c2pa.errors
    assert answer.c2pa.digital_source_type == "trainedAlgorithmicMedia"  # what it says, reported beside "invalid"
    assert (answer.ai_declared, answer.ai_hinted_unsigned) == (False, True)


@pytest.mark.parametrize(
    "properties",
    [
        f'<rdf:Description rdf:about="" {IPTC} Iptc4xmpExt:DigitalSourceType="{AI_SOURCE}"/>',
        f'<rdf:Description rdf:about="" {IPTC}><Iptc4xmpExt:DigitalSourceType>{AI_SOURCE}'
        "</Iptc4xmpExt:DigitalSourceType></rdf:Description>",
        f'<rdf:Description rdf:about="" {IPTC}><Iptc4xmpExt:DigitalSourceType rdf:resource="{AI_SOURCE}"/>'
        "</rdf:Description>",
    ],
    ids=["attribute", "element", "resource"],
)
def test_unsigned_xmp_that_says_ai_is_a_hint_not_a_declaration(properties: str):
    answer = read_provenance(_with_segment(_photo(1), 0xE1, _xmp(properties)))

    assert (answer.c2pa.present, answer.c2pa.state, answer.c2pa.valid) == (False, "absent", None)
    assert answer.metadata.digital_source_type == "trainedAlgorithmicMedia"
    assert answer.metadata.signed is False
    assert (answer.ai_declared, answer.ai_hinted_unsigned) == (False, True)


def test_xmp_that_says_camera_capture_hints_nothing():
    properties = (
        f'<rdf:Description rdf:about="" {IPTC} Iptc4xmpExt:DigitalSourceType="{AI_SOURCE[:-23]}digitalCapture"/>'
    )
    answer = read_provenance(_with_segment(_photo(1), 0xE1, _xmp(properties)))

    assert answer.metadata.digital_source_type == "digitalCapture"
    assert (answer.ai_declared, answer.ai_hinted_unsigned) == (False, False)


def _cut_manifest(payload: bytes) -> bytes:
    return payload[:500]


def _garbage_after_header(payload: bytes) -> bytes:
    rng = random.Random(7)
    return payload[:200] + bytes(rng.randrange(256) for _ in range(len(payload) - 200))


@pytest.mark.parametrize("make_payload", [_cut_manifest, _garbage_after_header], ids=["truncated", "garbage"])
def test_a_broken_manifest_is_reported_unreadable_not_raised(signed: Signed, make_payload):
    answer = read_provenance(_replace_manifest(signed.jpeg, make_payload))

    assert (answer.c2pa.present, answer.c2pa.state, answer.c2pa.valid) == (True, "unreadable", False)
    assert answer.c2pa.error  # c2pa's own words, e.g. "Verify: invalid CBOR box"
    assert answer.ai_declared is False


def test_a_file_cut_in_the_middle_of_its_manifest_is_unreadable(signed: Signed):
    pos, _, length = next(segment for segment in _segments(signed.jpeg) if segment[1] == 0xEB)

    answer = read_provenance(signed.jpeg[: pos + length // 2])

    assert (answer.c2pa.present, answer.c2pa.state, answer.c2pa.valid) == (True, "unreadable", False)
    assert answer.c2pa.error


def test_a_random_app11_segment_is_no_manifest():
    rng = random.Random(3)
    answer = read_provenance(_with_segment(_photo(2), 0xEB, bytes(rng.randrange(256) for _ in range(300))))

    assert (answer.c2pa.present, answer.c2pa.state, answer.c2pa.valid) == (False, "absent", None)


def test_exif_make_model_software_are_read_from_the_headers_alone(monkeypatch: pytest.MonkeyPatch):
    from PIL import ImageFile

    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0131] = "Canon", "EOS R5", "Firmware 1.8.1"

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for fmt in ("JPEG", "PNG", "WEBP"):
        metadata = read_provenance(_photo(4, fmt=fmt, exif=exif)).metadata
        assert (metadata.make, metadata.model, metadata.software) == ("Canon", "EOS R5", "Firmware 1.8.1"), fmt
        assert metadata.digital_source_type is None


def test_png_webp_and_other_bytes_never_raise():
    rng = random.Random(5)
    png, webp = _photo(6, fmt="PNG"), _photo(6, fmt="WEBP")
    for data, media_type in [
        (png, "image/png"),
        (webp, "image/webp"),
        (png[:40], "image/png"),
        (b"\xff\xd8\xff" + bytes(rng.randrange(256) for _ in range(500)), "image/jpeg"),
    ]:
        answer = read_provenance(data)
        assert answer.media_type == media_type
        assert (answer.c2pa.present, answer.c2pa.state, answer.ai_declared, answer.ai_hinted_unsigned) == (
            False,
            "absent",
            False,
            False,
        )
    for data in (b"", b"GIF89a" + bytes(100), bytes(rng.randrange(256) for _ in range(4096))):
        assert read_provenance(data) == provenance.Provenance()  # no media type: nothing is looked at


def test_a_file_over_the_size_limit_is_not_verified(signed: Signed):
    answer = read_provenance(signed.jpeg, max_bytes=len(signed.jpeg) - 1)

    assert (answer.c2pa.present, answer.c2pa.state, answer.c2pa.valid) == (True, "too_large", None)
    assert answer.ai_declared is False


def test_a_read_past_the_timeout_is_reported_and_its_late_answer_dropped(
    signed: Signed, monkeypatch: pytest.MonkeyPatch
):
    release, finished = threading.Event(), threading.Event()

    def stuck(*args):
        release.wait(10)
        finished.set()
        return provenance.C2paEvidence(
            present=True, state="valid", valid=True, digital_source_type="trainedAlgorithmicMedia"
        )

    monkeypatch.setattr(provenance, "_read_c2pa", stuck)
    started = time.monotonic()
    try:
        answer = read_provenance(signed.jpeg, timeout_s=0.05)
    finally:
        release.set()

    assert time.monotonic() - started < 2.0
    assert finished.wait(5)  # the abandoned read ran to its end, and its answer went nowhere
    assert (answer.c2pa.present, answer.c2pa.state, answer.c2pa.valid) == (True, "timeout", None)
    assert "0.05" in answer.c2pa.error
    assert (answer.ai_declared, answer.ai_hinted_unsigned) == (False, False)


def test_a_remote_manifest_url_is_reported_and_never_fetched():
    pytest.importorskip("c2pa")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/manifest.c2pa"
        properties = (
            f'<rdf:Description rdf:about="" xmlns:dcterms="http://purl.org/dc/terms/" dcterms:provenance="{url}"/>'
        )

        answer = read_provenance(_with_segment(_photo(8), 0xE1, _xmp(properties)))

        with pytest.raises(BlockingIOError):  # nobody connected: the uploader's URL was not requested
            server.accept()
    assert (answer.c2pa.present, answer.c2pa.state, answer.c2pa.valid) == (True, "remote", None)
    assert url in answer.c2pa.error


@pytest.mark.slow
def test_the_service_answers_every_manifest_with_its_verdict_and_evidence(signed: Signed, deploy, tmp_path) -> None:
    """Signed, edited after signing, and broken manifests through a real service: each a 200 with its verdict, the
    source head's scores and the provenance; the same evidence on /predict/explain and /predict/batch."""
    from app.config import Settings
    from serving.config import AppArgs
    from tests.helpers import make_checkpoint, undeploy, with_serve

    families = ["none", "autoencoder"]
    checkpoint = make_checkpoint(tmp_path / "ckpt", seed=3, crop_size=32, source_families=families)
    settings = Settings(work_dir=tmp_path / "work", serve={"rate_limit_per_minute": 0})
    app = deploy(
        "provenance", with_serve(settings, model_uri=str(checkpoint), champion_poll_s=0), AppArgs(autoscaling={})
    )
    photos = {
        "valid": signed.jpeg,
        "invalid": _edited(signed.jpeg),
        "unreadable": _replace_manifest(signed.jpeg, _garbage_after_header),
    }
    try:
        for state, data in photos.items():
            for route in ("/predict", "/predict/explain"):
                response = app.predict(data, filename=f"{state}.jpg", route=route)
                assert response.status_code == 200, (state, route, response.text)
                body = response.json()
                assert body["prediction"] in ("real", "ai_generated"), (state, route)
                assert body["provenance"]["c2pa"]["state"] == state, (state, route)
                assert body["provenance"]["ai_declared"] == (state == "valid"), (state, route)
                assert list(body["source_scores"]) == families, (state, route)
        files = [("files", (f"{state}.jpg", data, "image/jpeg")) for state, data in photos.items()]
        batch = app.http.post("/predict/batch", files=files).json()
        assert [item["provenance"]["c2pa"]["state"] for item in batch["results"]] == list(photos)
        assert all(list(item["source_scores"]) == families for item in batch["results"])
    finally:
        undeploy("provenance")

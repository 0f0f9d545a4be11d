"""unimm.data.image_files: what each verification level catches, on damage built by hand from real photos."""

from __future__ import annotations

import io
import pickle

import pytest
from PIL import Image
from skimage import data as skdata

from unimm.data.image_files import (
    VERIFY_LEVELS,
    ImageFileError,
    check_image,
    check_image_bytes,
    read_image,
)

HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def encode(fmt: str, **options) -> bytes:
    """A 160x120 crop of a real photo (scikit-image's astronaut), encoded as ``fmt``."""
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()[40:160, 180:340]).save(buf, format=fmt, **options)
    return buf.getvalue()


JPEGS = {"baseline": encode("JPEG", quality=90), "progressive": encode("JPEG", quality=90, progressive=True)}
PNG = encode("PNG")


def pil_decodes(data: bytes) -> bool:
    """The independent judge: does PIL decode the bytes in full?"""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:
        return False
    return True


def flipped_huffman_table(jpeg: bytes) -> bytes:
    """The JPEG with the 16 code-length counts of its first Huffman table (DHT segment) flipped to 0xFF: every
    marker and length is intact, the end-of-image marker is there, but no decoder can build the table."""
    start = jpeg.index(b"\xff\xc4") + 5  # marker, 2 length bytes, table class/id byte
    return jpeg[:start] + b"\xff" * 16 + jpeg[start + 16:]


def reason(data: bytes, verify: str) -> str | None:
    try:
        check_image_bytes(data, verify, "x.jpg")
    except ImageFileError as err:
        return err.reason
    return None


@pytest.mark.parametrize("verify", VERIFY_LEVELS)
@pytest.mark.parametrize("kind", sorted(JPEGS))
def test_whole_images_pass_and_keep_their_bytes(tmp_path, verify, kind):
    for name, data, fmt in ((f"{kind}.jpg", JPEGS[kind], "JPEG"), ("photo.png", PNG, "PNG")):
        assert pil_decodes(data)
        (tmp_path / name).write_bytes(data)
        image = read_image(tmp_path / name, verify)
        assert image.data == data and image.format == fmt
        assert (image.image is None) == (verify == "structure")


@pytest.mark.parametrize("verify", VERIFY_LEVELS)
@pytest.mark.parametrize("kind", sorted(JPEGS))
def test_a_truncated_jpeg_is_caught_at_both_levels(verify, kind):
    data = JPEGS[kind]
    for cut in (len(data) - 2, len(data) // 2, 700, 3):  # just the end-of-image marker lost ... header only
        assert not pil_decodes(data[:cut])
        with pytest.raises(ImageFileError) as err:
            check_image_bytes(data[:cut], verify, "photos/cut.jpg")
        assert err.value.reason == "bad_image" and str(err.value).startswith("photos/cut.jpg: ")
    with pytest.raises(ImageFileError, match="no JPEG end-of-image marker"):
        check_image_bytes(data[: len(data) // 2], "structure", "photos/cut.jpg")


def test_a_truncated_jpeg_with_an_exif_thumbnail_is_caught_without_decoding():
    """The thumbnail in the EXIF segment ends with its own FF D9: only one after the start of the scan counts."""
    thumbnail = encode("JPEG", quality=50)
    assert thumbnail.endswith(b"\xff\xd9")
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()[:256, :256]).save(buf, format="JPEG", exif=b"Exif\x00\x00" + thumbnail)
    data = buf.getvalue()
    assert thumbnail in data and reason(data, "structure") is None
    cut = data[: data.index(thumbnail) + len(thumbnail) + 5000]  # well past the thumbnail, far from the end
    assert not pil_decodes(cut)
    assert reason(cut, "structure") == "bad_image" and reason(cut, "decode") == "bad_image"


@pytest.mark.parametrize("verify", VERIFY_LEVELS)
def test_a_truncated_png_is_caught_at_both_levels(verify):
    for cut in (len(PNG) - 100, len(PNG) // 2, 20):  # the end of the image data lost ... IHDR only
        assert not pil_decodes(PNG[:cut])
        assert reason(PNG[:cut], verify) == "bad_image"
    with pytest.raises(ImageFileError, match="no PNG IEND chunk"):
        check_image_bytes(PNG[: len(PNG) // 2], "structure")


def test_a_png_cut_in_its_last_bytes_is_caught_by_structure_only():
    """PIL stops once the image data is decompressed: a file that lost its IEND chunk (and even the end of the
    last data chunk's CRC) decodes; the structure check wants the IEND chunk."""
    for cut in (PNG[:-1], PNG[:-12], PNG[:-16]):
        assert pil_decodes(cut)
        assert reason(cut, "structure") == "bad_image" and reason(cut, "decode") is None


@pytest.mark.parametrize("verify", VERIFY_LEVELS)
def test_an_html_page_or_an_empty_file_named_jpg_is_caught(tmp_path, verify):
    (tmp_path / "page.jpg").write_bytes(HTML)
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("page.jpg", "empty.jpg"):
        data, error = check_image(tmp_path / name, verify)
        assert data is None and error.reason == "bad_image" and str(tmp_path / name) in str(error)


@pytest.mark.parametrize("verify", VERIFY_LEVELS)
def test_a_missing_file_is_missing_image_with_its_path(tmp_path, verify):
    with pytest.raises(ImageFileError) as err:
        read_image(tmp_path / "gone.jpg", verify)
    assert err.value.reason == "missing_image" and str(tmp_path / "gone.jpg") in str(err.value)
    data, error = check_image(tmp_path, verify)  # a folder is no image file either
    assert data is None and error.reason == "missing_image"


@pytest.mark.parametrize("kind", sorted(JPEGS))
def test_a_flipped_byte_jpeg_that_pil_rejects_is_caught_by_decode_only(kind):
    bad = flipped_huffman_table(JPEGS[kind])
    assert len(bad) == len(JPEGS[kind]) and bad != JPEGS[kind]
    assert not pil_decodes(bad)
    assert reason(bad, "decode") == "bad_image"
    assert reason(bad, "structure") is None  # structurally whole: left to the data loader (see the module)


def test_bytes_after_the_end_of_image_are_allowed_as_decoders_allow_them():
    for data in (JPEGS["baseline"], PNG):
        padded = data + b"\x00trailing data appended by a camera or a proxy" * 20
        assert pil_decodes(padded)
        assert reason(padded, "structure") is None and reason(padded, "decode") is None


@pytest.mark.parametrize("verify", VERIFY_LEVELS)
def test_other_formats_are_decoded_at_both_levels(verify):
    gif = encode("GIF")
    image = check_image_bytes(gif, verify)
    assert image.format == "GIF" and image.image is not None and image.image.size == (160, 120)
    assert not pil_decodes(gif[: len(gif) // 2])
    assert reason(gif[: len(gif) // 2], verify) == "bad_image"


def test_an_unknown_level_is_a_value_error_naming_the_valid_ones(tmp_path):
    (tmp_path / "a.jpg").write_bytes(JPEGS["baseline"])
    for call in (lambda: check_image_bytes(JPEGS["baseline"], "fast"), lambda: read_image(tmp_path / "a.jpg", "full"),
                 lambda: check_image(tmp_path / "a.jpg", "")):
        with pytest.raises(ValueError, match="structure, decode"):
            call()


def test_the_error_survives_pickling_for_the_conversion_workers():
    err = ImageFileError("bad_image", "a/b.jpg", "no JPEG end-of-image marker (truncated?)")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.path, back.detail, str(back)) == (
        "bad_image", "a/b.jpg", "no JPEG end-of-image marker (truncated?)",
        "a/b.jpg: no JPEG end-of-image marker (truncated?)")

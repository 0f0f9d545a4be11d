"""Read an image file for a converter and check that it is whole, at one of two verification levels.

Every converter (M-BEIR, CC3M, MMEB, VisDial, MMDialog) reads its images through :func:`read_image` (or
:func:`check_image`); ``verify`` chooses how thoroughly a file is checked before it is written into a shard:

``"structure"`` (the default; no pixel is decoded): the format is identified by its magic bytes and checked
    structurally. A JPEG must start with ``FF D8 FF``, its marker segments must lead to a start-of-scan with a
    frame header before it, and an end-of-image marker ``FF D9`` must follow the start of the scan data (an
    ``FF D9`` before it, such as the end of an EXIF thumbnail, does not count; bytes after the end-of-image
    marker are allowed, as decoders allow them). A PNG must start with its 8-byte signature and an IHDR chunk
    and hold an IEND chunk (bytes after it are allowed). A few microseconds: less than reading the file.
``"decode"``: the thorough check used before this option existed: PIL opens the file and decodes it; a JPEG is
    entropy-decoded at 1/8 scale (``Image.draft``: every coefficient is still decoded, only the inverse DCT and
    colour conversion of full-size pixels are skipped), any other format is fully loaded.

Formats other than JPEG and PNG (GIF, WebP, BMP ...) are decoded with PIL at both levels.

What each level catches (``structure`` / ``decode``), measured on 200 damaged copies per kind of damage of real
photos at most 512 px (scikit-image's astronaut, coffee, chelsea, rocket), and the time per image
(``python experiments/benchmarks/bench_convert.py --catch-rates``):

================================  ===============  =================  ===============
damage                            baseline JPEG    progressive JPEG   PNG
================================  ===============  =================  ===============
cut at a random byte              200 / 200        200 / 200          200 / 200
an HTML error page                200 / 200        200 / 200          200 / 200
an empty file                     200 / 200        200 / 200          200 / 200
0.1% of the bytes flipped         4 / 71           1 / 113            6 / 200
a block of 512 bytes zeroed       4 / 5            1 / 3              0 / 200
ms per image                      0.004 / 0.66     0.002 / 1.8        0.001 / 5.0
================================  ===============  =================  ===============

So ``structure`` catches what failed downloads leave (cut transfers, error pages saved under an image name,
empty files) as ``decode`` does; ``decode`` also catches about half of the JPEGs with flipped bytes (184/400,
but few zeroed blocks) and every damaged PNG (PNG's checksums), at 0.7-5 ms per image, far more than reading
the file. Nothing that passes
``structure`` but does not decode is lost silently: the data loader decodes every image it uses and counts an
undecodable one as ``bad_image`` per shard (``unimm.data.records.decode_sample`` raises
``CorruptSample("bad_image")``, every reader counts it), so such a record is skipped and reported at training
or evaluation time instead of at conversion time. (``structure`` is stricter at the very end of a PNG: PIL
decodes a PNG that lost its IEND chunk, ``structure`` rejects it.)

Problems raise :class:`ImageFileError` with a reason, the path and what failed: ``missing_image`` (the file
cannot be read) or ``bad_image`` (the check failed, e.g. "no JPEG end-of-image marker (truncated?)").
"""

from __future__ import annotations

import argparse
import io
import os
from typing import NamedTuple

from PIL import Image

VERIFY_LEVELS = ("structure", "decode")
DEFAULT_VERIFY = "structure"
VERIFY_HELP = ("how image files are checked: 'structure' (default; JPEG/PNG markers and end of file, no decoding: "
               "catches truncated, empty and non-image files) or 'decode' (PIL decodes each image: also catches "
               "about half of the JPEGs with flipped bytes and damaged PNGs, at 0.7-5 ms per 512 px image); images "
               "that pass but do not decode are counted as bad_image by the data loader")

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IHDR = b"\x00\x00\x00\x0dIHDR"  # the first chunk: length 13, type IHDR
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last chunk: length 0, type, its (fixed) CRC
_JPEG_EOI = b"\xff\xd9"
# JPEG markers without a length field: TEM, RST0-7, SOI (EOI is handled on its own)
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
# start-of-frame markers: SOF0-3, 5-7, 9-11, 13-15 (C4 = DHT, C8 = JPG, CC = DAC are not frames)
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ImageFileError(Exception):
    """An image a converter cannot use: ``reason`` (``missing_image`` or ``bad_image``), the file and what
    failed. ``str()`` is ``"<path>: <detail>"``."""

    def __init__(self, reason: str, path: str, detail: str):
        super().__init__(reason, path, detail)  # all three in args: the error pickles (conversion workers)
        self.reason, self.path, self.detail = reason, path, detail

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}"


class ImageFile(NamedTuple):
    """A checked image file: its bytes as they are, its format (``"JPEG"``, ``"PNG"`` or PIL's name of another
    format) and, when it was decoded (any format at ``decode``, formats other than JPEG and PNG at both levels),
    the loaded PIL image (a JPEG's at 1/8 scale), else None."""

    data: bytes
    format: str
    image: Image.Image | None


def check_verify(verify: str) -> str:
    """``verify`` when it is a verification level; a ValueError naming the valid ones otherwise."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"unknown image verification level {verify!r}; valid: {', '.join(VERIFY_LEVELS)}")
    return verify


def add_verify_argument(parser: argparse.ArgumentParser) -> None:
    """``--verify-images {structure,decode}`` (default structure), the same on every converter's command line."""
    parser.add_argument("--verify-images", choices=VERIFY_LEVELS, default=DEFAULT_VERIFY, help=VERIFY_HELP)


def jpeg_problem(data: bytes) -> str | None:
    """What is structurally wrong with JPEG bytes (starting with ``FF D8 FF``), or None when they look whole.

    The marker segments after SOI are walked by their lengths up to the first start-of-scan (so an EXIF
    thumbnail's ``FF D9`` is skipped); the last ``FF D9`` of the file must come after it. In entropy-coded data
    an ``FF`` byte is always followed by ``00`` or a restart marker, so an ``FF D9`` there is the end of the image.
    Bytes that are not a marker between segments are skipped, as libjpeg does (with a warning) when decoding.
    """
    n = len(data)
    i = 2  # after SOI
    frame = False
    while True:
        if i + 4 > n:  # a marker and a segment length
            return "ends before its start-of-scan marker (truncated?)"
        if data[i] != 0xFF:  # extraneous bytes before a marker
            i = data.find(b"\xff", i)
            if i < 0:
                return "ends before its start-of-scan marker (truncated?)"
            continue
        code = data[i + 1]
        if code == 0xFF or code == 0:  # a fill byte, or FF 00 (not a marker)
            i += 1
            continue
        if code == 0xDA:
            break
        if code == 0xD9:
            return "end-of-image marker before any start-of-scan marker"
        if code in _STANDALONE:
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2:
            return f"marker segment FF{code:02X} at byte {i} has an invalid length {length}"
        if code in _FRAMES:
            frame = True
        i += 2 + length
    if not frame:
        return "no frame header (SOF marker) before the start-of-scan marker"
    if data.rfind(_JPEG_EOI, i) < 0:
        return "no JPEG end-of-image marker (truncated?)"
    return None


def png_problem(data: bytes) -> str | None:
    """What is structurally wrong with PNG bytes (starting with the PNG signature), or None when they look whole."""
    if data[8:16] != _PNG_IHDR:
        return "no IHDR chunk after the PNG signature"
    if data.rfind(_PNG_IEND, 16) < 0:
        return "no PNG IEND chunk (truncated?)"
    return None


def _decode(data: bytes, fmt: str | None) -> Image.Image:
    image = Image.open(io.BytesIO(data), formats=(fmt,) if fmt else None)
    if fmt == "JPEG":  # MPO (several JPEGs in one file) too: PIL's JPEG plugin opens it
        # 1/8 scale: every byte is still entropy-decoded (a cut or damaged file fails the same way) but the
        # inverse DCT and colour conversion of the full-size pixels, unused here, are skipped
        image.draft(None, (1, 1))
    image.load()  # a truncated file must fail here, not in a training run
    return image


def check_image_bytes(data: bytes, verify: str = DEFAULT_VERIFY, path: str = "") -> ImageFile:
    """Check encoded image bytes at level ``verify`` (see the module); ``path`` names them in the error.

    Raises:
        ImageFileError: ``bad_image`` with what failed.
        ValueError: an unknown ``verify``.
    """
    if verify != "structure" and verify != "decode":
        check_verify(verify)
    if verify == "structure":
        if data.startswith(JPEG_MAGIC):
            detail, fmt = jpeg_problem(data), "JPEG"
        elif data.startswith(PNG_MAGIC):
            detail, fmt = png_problem(data), "PNG"
        else:
            detail = fmt = None  # another format: decoded below
        if fmt is not None:
            if detail is not None:
                raise ImageFileError("bad_image", path, detail)
            return ImageFile(data, fmt, None)
    if not data:
        raise ImageFileError("bad_image", path, "empty file")
    fmt = "JPEG" if data.startswith(JPEG_MAGIC) else "PNG" if data.startswith(PNG_MAGIC) else None
    try:
        image = _decode(data, fmt)
    except Exception as err:  # PIL raises many types for broken files
        raise ImageFileError("bad_image", path, f"{type(err).__name__}: {err}") from err
    # a JPEG or PNG keeps the format of its magic bytes (as at "structure": both levels store the same bytes)
    return ImageFile(data, fmt or image.format or "", image)


def read_image(path: str | os.PathLike, verify: str = DEFAULT_VERIFY) -> ImageFile:
    """Read the image file ``path`` and check it at level ``verify`` (see the module).

    Raises:
        ImageFileError: ``missing_image`` (the file cannot be read) or ``bad_image`` (the check failed).
        ValueError: an unknown ``verify``.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ImageFileError("missing_image", os.fspath(path), err.strerror or str(err)) from err
    return check_image_bytes(data, verify, os.fspath(path))


def check_image(path: str | os.PathLike, verify: str = DEFAULT_VERIFY) -> tuple[bytes | None, ImageFileError | None]:
    """:func:`read_image` for converters that count problems: ``(bytes, None)`` for a usable image (bytes as
    they are), ``(None, error)`` otherwise (``error.reason`` is the count's key)."""
    try:
        return read_image(path, verify).data, None
    except ImageFileError as err:
        return None, err

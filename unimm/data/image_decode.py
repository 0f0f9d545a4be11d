"""Decoding image bytes in the data workers: exact full-size decode, or reduced-size JPEG decode for a known resize.

Exact (the default): PIL decodes the whole image; the processor resizes it as the official code does.

Reduced (``DecodeHint.resize`` set, ``data.collator.reduced_decode=true``): when the processor first resizes to a
size known in advance (:class:`ResizeTarget`: CLIP's shortest edge, BLIP's square) and the JPEG is larger than
that on both axes, libjpeg-turbo's DCT scaling decodes it at ``m/8`` of its size (``m`` = 1..7, the smallest that
keeps both sides at least the target; through ``simplejpeg``, since PIL's ``draft`` offers only 1/2, 1/4, 1/8),
and the decoded image is resized here to exactly the size the processor would have resized the full image to,
mapping the decoded pixels to the full image's coordinates (a scaled side ``W * m / 8`` that is not whole
leaves a partial last pixel, which a plain resize would stretch over the whole image). The processor's own
resize is then the identity and its crop sees the same geometry. Faster, not exact: the DCT scaling and this
resize (torch's antialiased bicubic / bilinear, which agrees with PIL's to 1 level) replace the processor's
single resize. README "Data at scale" gives the measured pixel differences; tests/test_decode.py bounds them.

Anything the reduced path cannot handle (CMYK JPEGs, other formats, an image no larger than the target,
damaged data) takes the exact path, so PIL alone decides which images are broken, whatever the setting.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

# the extension names the format: PIL need not probe every plugin (None = let it probe)
_PIL_FORMATS = {"jpg": ("JPEG",), "jpeg": ("JPEG",), "png": ("PNG",), "webp": ("WEBP",)}
# PIL filters the reduced path reproduces with torch's antialiased modes (both use PIL's kernels: bicubic a=-0.5)
_TORCH_MODES = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}
_SCALED_COLORSPACES = ("YCbCr", "Gray", "RGB")  # libjpeg-turbo converts these to RGB; CMYK / YCCK go to PIL


@dataclass(frozen=True)
class ResizeTarget:
    """The first resize of a processor, known before the image is decoded.

    Either ``shortest_edge`` (OpenAI CLIP / torchvision ``Resize(n)`` / HF ``shortest_edge``: the short side
    becomes ``n``, the long side ``int(n * long / short)``) or ``height`` and ``width`` (BLIP: the exact size).
    ``resample``: the PIL filter the processor resizes with.
    """

    shortest_edge: int | None = None
    height: int | None = None
    width: int | None = None
    resample: int = Image.Resampling.BICUBIC

    def __post_init__(self):
        if (self.shortest_edge is None) == (self.height is None or self.width is None):
            raise ValueError(f"ResizeTarget needs shortest_edge or height and width, got {self}")

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        """``(w, h)`` the processor resizes a ``width x height`` image to."""
        if self.shortest_edge is None:
            return self.width, self.height
        n = self.shortest_edge
        if width <= height:
            return n, int(n * height / width)
        return int(n * width / height), n


def _dct_scale(width: int, height: int, target: tuple[int, int]) -> int | None:
    """The smallest ``m`` in 1..7 with both sides of the ``m/8`` decode at least the target; None when only the
    full size (m = 8) covers it."""
    tw, th = target
    for m in range(1, 8):
        if width * m >= 8 * tw and height * m >= 8 * th:
            return m
    return None


def _resize_scaled(pixels: np.ndarray, extent: tuple[float, float], size: tuple[int, int], resample: int) -> Image.Image:
    """Resize the decoded ``[h, w, 3]`` uint8 ``pixels``, whose first ``extent = (W * m / 8, H * m / 8)``
    pixels span the full image, to ``size = (w, h)``."""
    if resample not in _TORCH_MODES:
        box = (0.0, 0.0, *extent)
        return Image.fromarray(pixels).resize(size, resample, box=box)
    x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # [1, 3, h, w] uint8: torch's vectorised path
    # source coordinate = (out + 0.5) * extent / size - 0.5: pass the scale, not the size, so that the partial
    # last pixel is not stretched; torch's output size is floor(in * scale), nudged up if rounding loses it
    scales = []
    for n_in, ext, n_out in ((x.shape[2], extent[1], size[1]), (x.shape[3], extent[0], size[0])):
        s = n_out / ext
        while math.floor(n_in * s) < n_out:
            s = math.nextafter(s, math.inf)
        scales.append(s)
    y = F.interpolate(x, scale_factor=scales, mode=_TORCH_MODES[resample], antialias=True,
                      recompute_scale_factor=False, align_corners=False)
    planes = y[0, :, : size[1], : size[0]].numpy()  # [3, h, w]: merged by PIL, faster than a permuted copy
    return Image.merge("RGB", [Image.fromarray(np.ascontiguousarray(plane)) for plane in planes])


def _decode_reduced(data: bytes, target: ResizeTarget) -> Image.Image | None:
    """The reduced-size decode, or None when it does not apply (the caller decodes exactly)."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    size = target.size_for(width, height)
    m = _dct_scale(width, height, size)
    if m is None or colorspace not in _SCALED_COLORSPACES:
        return None
    scaled = (-(-width * m // 8), -(-height * m // 8))  # libjpeg rounds up
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=scaled[0], min_height=scaled[1])
    except ValueError:  # damaged data: PIL's exact decode decides
        return None
    if pixels.shape[:2] != (scaled[1], scaled[0]):
        return None
    return _resize_scaled(pixels, (width * m / 8, height * m / 8), size, target.resample)


def decode_image(data: bytes, ext: str, resize: ResizeTarget | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image now (a truncated JPEG must fail here, not in the collator).

    ``ext``: the field's extension, tried first (a mislabelled file falls back to PIL's probing).
    ``resize``: decode a large JPEG at reduced size for this first resize (module docstring); None = exact.

    Raises whatever PIL raises for a broken file.
    """
    if resize is not None and ext in ("jpg", "jpeg"):
        image = _decode_reduced(data, resize)
        if image is not None:
            return image
    try:
        image = Image.open(io.BytesIO(data), formats=_PIL_FORMATS.get(ext))
    except Image.UnidentifiedImageError:  # mislabelled file (a PNG named .jpg): let PIL probe
        image = Image.open(io.BytesIO(data))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")  # no copy when already RGB

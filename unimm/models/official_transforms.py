"""The evaluation image transforms of the official code, reproduced without torchvision (PIL + torch only).

Hugging Face image processors are close to these but not equal: ``CLIPImageProcessor`` puts the centre-crop
offset at ``floor((h - crop) / 2)`` while torchvision's ``CenterCrop`` (used by OpenAI CLIP's ``_transform``)
rounds ``(h - crop) / 2.0`` with Python's ``round`` (half to even), so every image whose resized side minus the
crop is ``2k + 1`` with odd ``k`` is shifted by one pixel (e.g. 640x427 at 224: offset 56, HF 55).

- ``openai_clip`` (OpenAI CLIP ``clip._transform(n_px)``, which UniIR's CLIP_SF / CLIP_FF use through
  ``clip.load``): ``Resize(n_px, BICUBIC)`` on the PIL image (short side to ``n_px``, long side
  ``int(n_px * long / short)``), ``CenterCrop(n_px)`` with the rounded offset, RGB, ``ToTensor``, ``Normalize``
  with CLIP's mean / std.
- ``blip`` (BLIP / UniIR ``get_blip_transform(image_size, is_train=False)``): ``Resize((s, s), BICUBIC)``,
  ``ToTensor``, ``Normalize`` with the same mean / std; no crop.

Every image is converted to RGB first, as UniIR's dataset does (``Image.open(p).convert("RGB")`` before the
transform); OpenAI's ``_transform`` converts after the crop, which is the same for RGB and grayscale inputs.
torchvision resizes a PIL image with ``PIL.Image.resize`` (antialiased by construction), so this module does too.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from unimm.data.image_decode import ResizeTarget

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRANSFORMS = ("openai_clip", "blip")


def short_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``(w, h)`` after torchvision ``Resize(size)``: the short side becomes ``size``, the long side
    ``int(size * long / short)`` (truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """PIL crop box of torchvision ``CenterCrop(crop)``: offsets ``int(round((side - crop) / 2.0))``.

    Python's ``round`` (half to even) is what torchvision applies; HF's floor differs when the half-offset
    ends in .5 and rounds up.
    """
    if width < crop or height < crop:
        raise ValueError(f"centre crop {crop} is larger than the resized image {width}x{height}")
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    return left, top, left + crop, top + crop


def to_normalized_tensor(image: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """torchvision ``ToTensor`` + ``Normalize``: uint8 HWC -> float32 CHW in [0, 1], then ``(x - mean) / std``
    in float32 ``[3, H, W]``."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return pixels.sub(mean_t).div(std_t)


class OfficialImageTransform:
    """One official evaluation transform behind the Hugging Face image-processor call
    ``transform(images=[...], return_tensors="pt")["pixel_values"]`` -> ``[N, 3, size, size]`` float32.

    Args:
        kind: ``openai_clip`` (resize short side, rounded centre crop) or ``blip`` (resize to the square).
        size: output side in pixels (CLIP ViT-L/14: 224; UniIR BLIP: 224).
        mean, std: normalisation (both official transforms use CLIP's values).
    """

    def __init__(self, kind: str, size: int, mean=CLIP_MEAN, std=CLIP_STD):
        if kind not in TRANSFORMS:
            raise ValueError(f"image transform {kind!r}; valid: {list(TRANSFORMS)}")
        self.kind, self.size, self.mean, self.std = kind, int(size), tuple(mean), tuple(std)

    @property
    def resize_target(self) -> ResizeTarget:
        """The first resize, for reduced-size decoding in the data workers (``data.collator.reduced_decode``)."""
        if self.kind == "blip":
            return ResizeTarget(height=self.size, width=self.size, resample=Image.BICUBIC)
        return ResizeTarget(shortest_edge=self.size, resample=Image.BICUBIC)

    def transform(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> ``[3, size, size]``."""
        image = image.convert("RGB") if image.mode != "RGB" else image
        if self.kind == "blip":
            image = image.resize((self.size, self.size), Image.BICUBIC)
        else:
            new = short_side_size(image.width, image.height, self.size)
            if new != image.size:  # torchvision returns the image untouched when the size already fits
                image = image.resize(new, Image.BICUBIC)
            box = center_crop_box(image.width, image.height, self.size)
            image = image.crop(box)
        return to_normalized_tensor(image, self.mean, self.std)

    def __call__(self, images, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        images = [images] if isinstance(images, Image.Image) else list(images)
        return {"pixel_values": torch.stack([self.transform(im) for im in images])}

    def __repr__(self) -> str:
        return f"OfficialImageTransform(kind={self.kind!r}, size={self.size})"

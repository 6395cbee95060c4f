"""Deterministic image geometry shared by the TFDS and folder readers: centre crop + resize."""

from __future__ import annotations

import numpy as np
from PIL import Image


def crop_box(width: int, height: int, crop_size: int = 0) -> tuple[int, int, int, int]:
  """The centred square `(left, top, right, bottom)` of side `crop_size` (0: the shorter side).

  A `crop_size` larger than the image is clamped to its shorter side.
  """
  s = min(width, height) if crop_size <= 0 else min(crop_size, width, height)
  left, top = (width - s) // 2, (height - s) // 2
  return left, top, left + s, top + s


def crop_resize_pil(img: Image.Image, resolution: int, crop_size: int = 0) -> Image.Image:
  """Centre-crops a PIL image to a square and resizes it (bicubic, antialiased) to `resolution`."""
  box = crop_box(img.width, img.height, crop_size)
  if box != (0, 0, img.width, img.height):
    img = img.crop(box)
  if img.width != resolution:
    img = img.resize((resolution, resolution), Image.BICUBIC)
  return img


def crop_resize_array(img: np.ndarray, resolution: int, crop_size: int = 0) -> np.ndarray:
  """The same for a uint8 `[H, W, C]` array; returns `[resolution, resolution, C]`."""
  h, w = img.shape[:2]
  left, top, right, bottom = crop_box(w, h, crop_size)
  img = img[top:bottom, left:right]
  if img.shape[0] == resolution:
    return img
  squeeze = img.shape[-1] == 1
  pil = Image.fromarray(img[..., 0] if squeeze else img)
  out = np.asarray(pil.resize((resolution, resolution), Image.BICUBIC))
  return out[..., None] if squeeze else out

"""Pictures for humans: image grids, scatter plots and loss curves, drawn with Pillow."""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(x: np.ndarray, centered: bool) -> np.ndarray:
  """Model-space images ([-1, 1] if centered else [0, 1]) -> uint8."""
  x = np.asarray(x, np.float32)
  if centered:
    x = (x + 1.0) / 2.0
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1, pad_value: int = 255) -> np.ndarray:
  """Tiles uint8 images `[N, H, W, C]` into one `[rows*(H+pad)+pad, ..., C]` array."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  n, h, w, c = images.shape
  ncol = ncol or int(math.ceil(math.sqrt(n)))
  nrow = int(math.ceil(n / ncol))
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, images.dtype)
  for i in range(n):
    r, q = divmod(i, ncol)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
  return grid


def save_image_grid(images_uint8: np.ndarray, path: str, ncol: int | None = None, scale: int | None = None) -> str:
  """Writes a PNG grid; small images are upscaled (nearest) so the grid is at least ~512 px."""
  grid = image_grid(images_uint8, ncol)
  if scale is None:
    scale = max(1, 512 // max(grid.shape[:2]))
  img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)
  return path


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
  if hi <= lo:
    return [lo]
  raw = (hi - lo) / n
  mag = 10 ** math.floor(math.log10(raw))
  step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
  start = math.ceil(lo / step) * step
  return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _axes(draw, box, xlim, ylim, xlabel, ylabel, ylog=False):
  x0, y0, x1, y1 = box
  draw.rectangle(box, outline=(0, 0, 0))
  fx = lambda v: x0 + (v - xlim[0]) / max(xlim[1] - xlim[0], 1e-12) * (x1 - x0)
  fy = lambda v: y1 - (v - ylim[0]) / max(ylim[1] - ylim[0], 1e-12) * (y1 - y0)
  for v in _nice_ticks(*xlim):
    draw.line([(fx(v), y1), (fx(v), y1 + 4)], fill=(0, 0, 0))
    draw.text((fx(v) - 12, y1 + 6), f"{v:g}", fill=(0, 0, 0))
  for v in _nice_ticks(*ylim):
    draw.line([(x0 - 4, fy(v)), (x0, fy(v))], fill=(0, 0, 0))
    draw.line([(x0, fy(v)), (x1, fy(v))], fill=(225, 225, 225))
    lab = f"{10 ** v:.3g}" if ylog else f"{v:.3g}"
    draw.text((4, fy(v) - 5), lab, fill=(0, 0, 0))
  draw.text(((x0 + x1) // 2 - 3 * len(xlabel), y1 + 22), xlabel, fill=(0, 0, 0))
  draw.text((x0, y0 - 16), ylabel, fill=(0, 0, 0))
  return fx, fy


def save_loss_curve(steps: Sequence[float], losses: Sequence[float], path: str, title: str = "training loss",
                    log_y: bool = True, size: tuple[int, int] = (720, 420)) -> str:
  """Line plot of loss vs step (log-scale y by default), with a smoothed line on top."""
  steps = np.asarray(steps, np.float64)
  vals = np.asarray(losses, np.float64)
  keep = np.isfinite(vals) & ((vals > 0) if log_y else True)
  steps, vals = steps[keep], vals[keep]
  img = Image.new("RGB", size, (255, 255, 255))
  draw = ImageDraw.Draw(img)
  box = (70, 30, size[0] - 20, size[1] - 45)
  if len(vals) == 0:
    draw.text((box[0] + 10, box[1] + 10), "no finite loss values", fill=(0, 0, 0))
  else:
    y = np.log10(vals) if log_y else vals
    ylim = (float(y.min()), float(y.max()) if y.max() > y.min() else float(y.min()) + 1e-3)
    xlim = (float(steps.min()), float(steps.max()) if steps.max() > steps.min() else float(steps.min()) + 1)
    fx, fy = _axes(draw, box, xlim, ylim, "step", f"{title}{' (log scale)' if log_y else ''}", ylog=log_y)
    pts = [(fx(s), fy(v)) for s, v in zip(steps, y)]
    if len(pts) > 1:
      draw.line(pts, fill=(150, 180, 230), width=1)
      k = max(1, len(y) // 20)
      smooth = np.convolve(y, np.ones(k) / k, mode="valid")
      draw.line([(fx(s), fy(v)) for s, v in zip(steps[k - 1:], smooth)], fill=(20, 60, 160), width=2)
    else:
      draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=(20, 60, 160))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)
  return path


def save_scatter(points: np.ndarray, path: str, reference: np.ndarray | None = None,
                 size: int = 512, lim: float | None = None) -> str:
  """2-D scatter of samples (blue) over optional reference points (grey)."""
  pts = np.asarray(points, np.float64)[:, :2]
  allp = pts if reference is None else np.concatenate([pts, np.asarray(reference)[:, :2]])
  lim = lim or float(np.nanmax(np.abs(allp[np.isfinite(allp).all(1)]))) * 1.1 or 1.0
  img = Image.new("RGB", (size, size), (255, 255, 255))
  draw = ImageDraw.Draw(img)
  box = (50, 20, size - 20, size - 40)
  fx, fy = _axes(draw, box, (-lim, lim), (-lim, lim), "x1", "x2")
  for arr, col in ((reference, (170, 170, 170)), (pts, (30, 80, 200))):
    if arr is None:
      continue
    for x, y in np.asarray(arr)[:, :2]:
      if np.isfinite(x) and np.isfinite(y) and abs(x) <= lim and abs(y) <= lim:
        draw.point((fx(x), fy(y)), fill=col)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)
  return path


def side_by_side(columns: Sequence[np.ndarray], pad: int = 1, pad_value: int = 255) -> np.ndarray:
  """Rows of images side by side: column j holds uint8 images `[N, H_j, W_j, C_j]`.

  Row i is `columns[0][i] | columns[1][i] | ...`. Grey columns are repeated to RGB when
  any column is RGB; smaller images (e.g. a low-resolution input) are upscaled by nearest
  neighbour to the tallest column's height (an integer factor, then padded if needed).
  """
  cols = [np.asarray(c) for c in columns]
  cols = [c[..., None] if c.ndim == 3 else c for c in cols]
  n = cols[0].shape[0]
  if any(c.shape[0] != n for c in cols):
    raise ValueError(f"side_by_side: every column needs the same number of images; got "
                     f"{[c.shape[0] for c in cols]}.")
  channels = 3 if any(c.shape[-1] == 3 for c in cols) else 1
  h = max(c.shape[1] for c in cols)
  fitted = []
  for c in cols:
    if c.shape[-1] != channels:
      c = np.repeat(c, channels, axis=-1)
    f = max(1, h // c.shape[1])
    c = np.repeat(np.repeat(c, f, axis=1), f, axis=2)
    if c.shape[1] < h:
      c = np.pad(c, ((0, 0), (0, h - c.shape[1]), (0, 0), (0, 0)), constant_values=pad_value)
    fitted.append(c)
  widths = [c.shape[2] for c in fitted]
  out = np.full((n * (h + pad) + pad, sum(widths) + pad * (len(widths) + 1), channels), pad_value, np.uint8)
  for i in range(n):
    x = pad
    for c, w in zip(fitted, widths):
      out[pad + i * (h + pad): pad + i * (h + pad) + h, x:x + w] = c[i]
      x += w + pad
  return out


def save_side_by_side(columns: Sequence[np.ndarray], path: str, titles: Sequence[str] | None = None,
                      scale: int | None = None) -> str:
  """Writes `side_by_side(columns)` as a PNG, upscaled (nearest) to ~512 px, titled per column."""
  grid = side_by_side(columns)
  if scale is None:
    scale = max(1, min(512 // grid.shape[1], 2048 // grid.shape[0]) if grid.shape[1] < 512 else 1)
  img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).convert("RGB")
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  if titles:
    head = 14
    canvas = Image.new("RGB", (img.width, img.height + head), (255, 255, 255))
    canvas.paste(img, (0, head))
    draw = ImageDraw.Draw(canvas)
    widths = [np.asarray(c).shape[2] * max(1, max(np.asarray(k).shape[1] for k in columns) // np.asarray(c).shape[1])
              for c in columns]
    x = 1
    for title, w in zip(titles, widths):
      draw.text((x * scale + 2, 1), str(title), fill=(0, 0, 0))
      x += w + 1
    img = canvas
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)
  return path

"""XLA flags jaxdiff sets by default, and why (measured; `benchmarks/RESULTS.md`).

XLA:CPU in jaxlib 0.10-0.12 hands every convolution and dot to YNNPACK. On the DDPM U-Nets
its convolutions are the slower choice: its forward runs narrow (32-64 channel) convs at
~40 GFLOP/s in the network, and its weight gradients (a whole-map window) ~4x slower
than the forward. Turning YNNPACK off for convolutions and dots (XLA's Eigen kernels
instead) made the 2-core CPU train step 1.5x faster (big U-Net 3.1 -> 4.8 img/s, small
20 -> 32) and sampling 1.1-1.4x, with lower peak memory.

The flag is appended to `XLA_FLAGS` when `jaxdiff` is imported, which works as long as no
JAX computation has run yet (XLA reads the variable when the backend starts). It is left
out when `XLA_FLAGS` already mentions the option (yours wins), when
`JAXDIFF_XLA_DEFAULTS=0`, and for jaxlib versions it was not tested with (an unknown flag
aborts XLA). It only affects the CPU backend.
"""

from __future__ import annotations

import os

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot"
# 0.12 (what pip installs on Python >= 3.12 in 2026-11): the same YNNPACK fusions; with the flag
# the big U-Net trains 4.53-4.90 img/s instead of 3.88-4.13 (RESULTS.md, session 32).
_TESTED_JAXLIB = ((0, 10), (0, 11), (0, 12))


def _jaxlib_version() -> tuple[int, int] | None:
  try:
    import jaxlib.version
    major, minor = jaxlib.version.__version__.split(".")[:2]
    return int(major), int(minor)
  except Exception:  # noqa: BLE001 - unknown layout: treat as untested
    return None


def tuned_jaxlib() -> bool:
  """Whether the installed jaxlib is one jaxdiff's XLA:CPU tuning was measured on (the flag
  here, and the layer rewrites in `models/layers.py` whose fusion XLA's version decides).
  Older ones compute the same numbers, with XLA's own choices of fusion and kernels."""
  return _jaxlib_version() in _TESTED_JAXLIB


def default_flags(environ=None, jaxlib_version: tuple[int, int] | None = None) -> str:
  """The flags jaxdiff would add to `environ`'s XLA_FLAGS ('' for none)."""
  environ = os.environ if environ is None else environ
  if environ.get("JAXDIFF_XLA_DEFAULTS", "1") == "0":
    return ""
  if "xla_cpu_experimental_ynn_fusion_type" in environ.get("XLA_FLAGS", ""):
    return ""
  version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
  if version not in _TESTED_JAXLIB:
    return ""
  return CPU_CONV_FLAG


def apply_defaults(environ=None) -> str:
  """Append `default_flags()` to XLA_FLAGS; returns what was added."""
  environ = os.environ if environ is None else environ
  extra = default_flags(environ)
  if extra:
    environ["XLA_FLAGS"] = (environ.get("XLA_FLAGS", "") + " " + extra).strip()
  return extra


def ynn_convolutions_enabled(environ=None) -> bool:
  """Whether XLA:CPU will run convolutions through YNNPACK (i.e. the flag is not in effect)."""
  environ = os.environ if environ is None else environ
  return "-individual_convolution" not in environ.get("XLA_FLAGS", "")

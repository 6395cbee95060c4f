"""Errors jaxdiff raises for bad input, and the one-line reporting the scripts use.

Every error names the argument, the value it got and the fix, in one line, e.g.

  ConfigError: config.training.batch_size=100 is not divisible by the 8 devices of the
  mesh's data axes; use a multiple of 8 (e.g. --config.training.batch_size=104).

Library code raises these; `run_train.py` / `run_sample.py` turn them into a single
`error: ...` line on stderr and exit status 1 (see `one_line_errors`).
"""

from __future__ import annotations

import contextlib
import sys


class JaxdiffError(Exception):
  """Base class of the errors jaxdiff raises for bad input or unrecoverable state."""


class ConfigError(JaxdiffError, ValueError):
  """A config value is invalid or inconsistent with the data, model or devices."""


class CheckpointError(JaxdiffError):
  """A checkpoint is missing or does not match the config it is restored into."""


class DataError(JaxdiffError, ValueError):
  """A dataset is unknown, missing, unprepared or has the wrong shape."""


class NonFiniteLossError(JaxdiffError, FloatingPointError):
  """Training produced a NaN/inf loss; the last good checkpoint is kept."""


class InputError(JaxdiffError, ValueError):
  """A function argument (array shape, dtype, option name) is invalid."""


@contextlib.contextmanager
def one_line_errors():
  """Turns a `JaxdiffError` into `error: <message>` on stderr and exit status 1."""
  try:
    yield
  except JaxdiffError as e:
    msg = " ".join(str(e).split())
    print(f"error: {type(e).__name__}: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


def check_choice(name: str, value, choices) -> None:
  """Raises InputError if `value` is not one of `choices`, listing the valid ones."""
  if value not in choices:
    valid = ", ".join(repr(c) for c in choices)
    raise InputError(f"{name}={value!r} is not known; valid values are: {valid}.")


def split_source(key: str, value: str, sources, forms: str) -> tuple[str, str]:
  """'<source>:<path>' -> (source, path) with `source` in `sources`; a ConfigError naming `key`
  and the valid `forms` (a phrase: "use 'a:<...>' or ...") otherwise."""
  source, sep, path = str(value).partition(":")
  if not sep or source not in sources or not path:
    raise ConfigError(f"{key}={value!r} is not '<source>:<path>'; {forms}.")
  return source, path

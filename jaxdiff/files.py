"""Small JSON files the runs write beside their outputs: read if there, written atomically."""

from __future__ import annotations

import json
import os
from typing import Any


def read_json(path: str) -> Any:
  """The JSON in `path`, or None where there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value: Any) -> str:
  """Writes `value` to `path` through a temporary file and a rename, so a reader (or a run that
  stops midway) never sees half of it; returns `path`."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)
  return path

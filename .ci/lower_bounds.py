"""The lowest versions pyproject.toml allows, as pip constraints (`name==version` lines).

`python .ci/lower_bounds.py` prints them for .ci/lowest; `tests/test_readme.py` reads them
with `lower_bounds()`. Every requirement must have a plain '>=' bound, or it would go untested.
"""

import os
import re
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lower_bounds(extras: tuple[str, ...] = ("test",)) -> dict[str, str]:
  """{name: lowest version} of the package's requirements and those of `extras`."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  reqs = list(project["dependencies"])
  for extra in extras:
    reqs += project["optional-dependencies"][extra]
  bounds = {}
  for req in reqs:
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", req)
    if m is None:
      raise ValueError(f"pyproject.toml: {req!r} has no plain '>=' lower bound for .ci/lowest to test")
    bounds[m[1]] = m[2]
  return bounds


if __name__ == "__main__":
  try:
    bounds = lower_bounds()
  except ValueError as e:
    sys.exit(str(e))
  if "jax" in bounds:  # not a direct dependency, but each jax release needs its own jaxlib
    bounds["jaxlib"] = bounds["jax"]
  print("\n".join(f"{name}=={version}" for name, version in bounds.items()))

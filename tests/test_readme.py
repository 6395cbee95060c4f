"""The README stays true: its API example runs, and CI's test command is the README's."""

import os
import re

import jax.numpy as jnp
import pytest

from conftest import ROOT


def readme():
  with open(os.path.join(ROOT, "README.md")) as f:
    return f.read()


def python_blocks(text):
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


BLOCKS = python_blocks(readme())


def is_library_tour(code):
  return "UNet(" in code and "method=\"ddim\"" in code


def test_readme_has_its_python_examples():
  assert len(BLOCKS) >= 3, "README lost its python examples"
  assert sum(map(is_library_tour, BLOCKS)) == 1


# One test per block, so pytest-xdist spreads them over its workers.
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_example_runs(index):
  code = BLOCKS[index]
  scope = {}
  exec(compile(code, f"README.md python block {index}", "exec"), scope)  # noqa: S102
  if is_library_tour(code):
    assert int(scope["info"]["nfe"]) == 20
    assert scope["x"].shape == (4, 16, 16, 3)
  for name in ("x", "logp", "bpd", "vlb"):
    if name in scope:
      assert bool(jnp.all(jnp.isfinite(scope[name]))), name


def test_ci_runs_the_readme_test_command():
  text = readme()
  assert re.search(r'^pip install -e "\.\[test\]" && python -m pytest', text, flags=re.M)
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    assert "grep -m1 -E '^pip install -e \"\\.\\[test\\]\"' README.md" in f.read()


def test_every_requirement_has_the_lower_bound_ci_lowest_tests_and_the_readme_lists_it():
  import tomllib

  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  bounds = {}
  for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", req)
    assert m, f"pyproject.toml: {req!r} needs a plain '>=' lower bound: .ci/lowest installs and tests it"
    bounds[m[1]] = m[2]
  text = readme()
  assert f"Python >= {project['requires-python'].removeprefix('>=')}" in text
  for req in project["dependencies"]:
    name = re.match(r"[A-Za-z0-9_.\-]+", req)[0]
    assert f"{name} >= {bounds[name]}" in text, f"README.md does not list {name}'s lower bound {bounds[name]}"
  with open(os.path.join(ROOT, ".ci", "lowest")) as f:
    assert "PIP_CONSTRAINT" in f.read()

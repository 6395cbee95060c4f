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
  import importlib.util
  import tomllib

  spec = importlib.util.spec_from_file_location("lower_bounds", os.path.join(ROOT, ".ci", "lower_bounds.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.lower_bounds()  # every requirement, the test extra's too, has a bound .ci/lowest can pin
  text = readme()
  for name, low in module.lower_bounds(extras=()).items():
    assert f"{name} >= {low}" in text, f"README.md does not list {name}'s lower bound {low}"
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    assert f"Python >= {tomllib.load(f)['project']['requires-python'].removeprefix('>=')}" in text
  with open(os.path.join(ROOT, ".ci", "lowest")) as f:
    lowest = f.read()
  assert "python .ci/lower_bounds.py" in lowest and "PIP_CONSTRAINT" in lowest

"""The README stays true: its API example runs, and CI's test command is the README's."""

import os
import re

import jax.numpy as jnp

from conftest import ROOT


def readme():
  with open(os.path.join(ROOT, "README.md")) as f:
    return f.read()


def python_blocks(text):
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_python_example_runs():
  blocks = python_blocks(readme())
  assert len(blocks) >= 3, "README lost its python examples"
  scopes = []
  for code in blocks:
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    scopes.append(scope)
  api = next(s for s, code in zip(scopes, blocks) if "UNet(" in code)  # the library tour
  assert int(api["info"]["nfe"]) == 20
  assert api["x"].shape == (4, 16, 16, 3)
  for scope in scopes:
    for name in ("x", "logp", "bpd", "vlb"):
      if name in scope:
        assert bool(jnp.all(jnp.isfinite(scope[name]))), name


def test_ci_runs_the_readme_test_command():
  text = readme()
  assert re.search(r'^pip install -e "\.\[test\]" && python -m pytest', text, flags=re.M)
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    assert "grep -m1 -E '^pip install -e \"\\.\\[test\\]\"' README.md" in f.read()

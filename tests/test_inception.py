"""The FID Inception network equals pytorch-fid's, and torch checkpoints are read without torch."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from jaxdiff.errors import InputError
from jaxdiff.models import inception

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
HERE = os.path.join(FIXTURES, "fid_inception")


def _maker():
  spec = importlib.util.spec_from_file_location("make_fid_inception_fixture",
                                                os.path.join(FIXTURES, "make_fid_inception_fixture.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_features_match_pytorch_fid(tmp_path):
  """pytorch-fid's InceptionV3 (resize to 299, [0, 1] -> [-1, 1], the FID blocks) on seeded weights:
  the same 2048 features for RGB images and for grey ones of another size, from the state dict
  and from an .npz of it; a state dict of another network is an InputError naming the layer."""
  with open(os.path.join(HERE, "layout.json")) as f:
    layout = json.load(f)
  state = _maker().seeded_state_dict(layout)
  params = inception.convert_fid_inception_state_dict(state)
  io = np.load(os.path.join(HERE, "io.npz"))
  feats = jax.jit(inception.fid_features)
  fx, fg = np.asarray(feats(params, io["x"])), np.asarray(feats(params, io["g"]))
  assert fx.shape == (2, inception.FEATURES) and np.mean(io["fx"] > 0) > 0.5  # not a dead network
  for got, want in ((fx, io["fx"]), (fg, io["fg"])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())  # measured: 6e-7 of the max
  f2, logits = jax.jit(inception.features_and_logits)(params, io["x"])  # torch's fc without its bias
  want = io["fx"].astype(np.float64) @ state["fc.weight"].T.astype(np.float64)
  np.testing.assert_array_equal(np.asarray(f2), fx)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  np.savez(tmp_path / "w.npz", **state)
  again = inception.load_fid_inception(tmp_path / "w.npz")
  assert jax.tree.all(jax.tree.map(np.array_equal, again, params))

  bad = dict(state)
  bad["Mixed_6b.branch7x7_2.conv.weight"] = bad["Mixed_6b.branch7x7_2.conv.weight"].transpose(0, 1, 3, 2)
  with pytest.raises(InputError, match=r"'Mixed_6b.branch7x7_2' has kernel \(7, 1, 128, 128\) \(HWIO\), the "
                                       r"network \(1, 7, 128, 128\)"):
    inception.convert_fid_inception_state_dict(bad)
  with pytest.raises(InputError, match=r"lacks 1 layer\(s\), e.g. \['Mixed_7c/branch_pool'\]"):
    inception.convert_fid_inception_state_dict({k: v for k, v in state.items() if "Mixed_7c.branch_pool" not in k})
  with pytest.raises(InputError, match=r"has no classifier \(fc.weight\)"):
    inception.convert_fid_inception_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
  with pytest.raises(InputError, match=r"FID features take images \[B, H, W, 1 or 3\]"):
    inception.fid_features(params, io["x"][..., :2])
  with pytest.raises(InputError, match="pt_inception-2015-12-05-6726825d.pth and pass its path"):
    inception.load_fid_inception(tmp_path / "missing.pth")


def test_inception_score_closed_forms():
  """Confident predictions spread evenly over K classes score K; one class for all, or no
  confidence, scores 1; each split is scored on its own."""
  k, n = 7, 700
  confident = np.zeros((n, inception.CLASSES))
  confident[np.arange(n), np.arange(n) % k] = 60.0  # p(y|x) one-hot to 1e-23
  mean, std = inception.inception_score(confident, splits=10)
  assert abs(mean - k) < 1e-9 and std < 1e-9
  assert abs(inception.inception_score(np.zeros((n, 1008)))[0] - 1.0) < 1e-12
  same = np.zeros((n, 1008))
  same[:, 3] = 60.0
  assert abs(inception.inception_score(same)[0] - 1.0) < 1e-9
  halves = np.concatenate([confident[:350], same[:350]])  # split 1..5: 7 classes, 6..10: one
  mean, std = inception.inception_score(halves, splits=10)
  assert abs(mean - 4.0) < 1e-6 and abs(std - 3.0) < 1e-6
  with pytest.raises(InputError, match="N >= splits=10"):
    inception.inception_score(confident[:5])


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_torch_files_are_read_without_torch(fmt, tmp_path):
  """torch.save's zip and legacy formats: views (transposed, sliced), float16, bfloat16, int64,
  bool and 0-d tensors, nested dicts; a file that is not a state dict is a one-line error."""
  got = inception.read_torch_file(os.path.join(HERE, f"tensors_{fmt}.pth"))
  want = dict(np.load(os.path.join(HERE, "tensors.npz")))
  assert set(got) == {k for k in want if "." not in k} | {"nested"}
  got = dict(got, **{"nested.w": got.pop("nested")["w"]})
  for k, v in want.items():
    g = np.asarray(got[k], np.float32) if k == "bf16" else got[k]
    assert g.dtype == v.dtype and g.shape == v.shape, (k, g.dtype, v.dtype, g.shape, v.shape)
    np.testing.assert_array_equal(g, v, err_msg=k)
  assert str(got["bf16"].dtype) == "bfloat16"
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(InputError, match="cannot read .*junk.pth' as a torch.save state dict"):
    inception.read_torch_file(tmp_path / "junk.pth")
  if fmt == "legacy":  # the tensors' bytes come last: a cut file must not be read past its end
    raw = open(os.path.join(HERE, "tensors_legacy.pth"), "rb").read()
    (tmp_path / "cut.pth").write_bytes(raw[:-10])
    with pytest.raises(InputError, match="ends inside a tensor's data: the file is truncated"):
      inception.read_torch_file(tmp_path / "cut.pth")


def test_fid_of_a_run_against_its_data(tiny_run, tmp_path):
  """run_sample.py --mode fid's library side on configs/tiny.py (seeded Inception weights): the data's
  statistics are written and, passed back as the reference, give the same FID; bad references are
  one-line errors."""
  from jaxdiff import evaluate, fid

  with open(os.path.join(HERE, "layout.json")) as f:
    np.savez(tmp_path / "inception.npz", **_maker().seeded_state_dict(json.load(f)))
  config, workdir = tiny_run
  kw = dict(inception_path=str(tmp_path / "inception.npz"), num_samples=8, method="ddim", num_steps=2,
            feature_batch=8, out_dir=str(tmp_path / "eval"))
  first = fid.evaluate_fid(config, workdir, num_ref=8, **kw)
  with open(first["path"]) as f:
    saved = json.load(f)
  assert os.path.basename(first["path"]) == "fid_ddim_2nfe_step2_seed0.json"
  assert saved["fid"] == first["fid"] > 0 and saved["num_samples"] == 8 and saved["ref_n"] == 8
  assert 1.0 <= saved["inception_score"] <= inception.CLASSES and saved["is_splits"] == 8
  mu, sigma = fid.load_statistics(saved["ref"])
  assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
  again = fid.evaluate_fid(config, workdir, ref=saved["ref"], **kw)
  assert again["fid"] == first["fid"] and again["ref"] == saved["ref"]

  self_fid = evaluate.frechet_distance_from_statistics(mu, sigma, mu, sigma)
  assert abs(self_fid) < 1e-5 * np.trace(sigma), (self_fid, np.trace(sigma))  # rank 7 of 2048: rounding only
  np.savez(tmp_path / "bad.npz", mu=mu[:10], sigma=sigma[:10, :10])
  with pytest.raises(InputError, match=r"holds statistics of shapes \(10,\) and \(10, 10\)"):
    fid.load_statistics(str(tmp_path / "bad.npz"))
  with pytest.raises(InputError, match=r"--fid_ref='nope.npz' is not a file"):
    fid.evaluate_fid(config, workdir, ref="nope.npz", **kw)

"""The FID Inception network equals pytorch-fid's, and torch checkpoints are read without torch."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from jaxdiff.errors import InputError
from jaxdiff.models import inception, torch_file

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
  got = torch_file.read_torch_file(os.path.join(HERE, f"tensors_{fmt}.pth"))
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
    torch_file.read_torch_file(tmp_path / "junk.pth")
  if fmt == "legacy":  # the tensors' bytes come last: a cut file must not be read past its end
    raw = open(os.path.join(HERE, "tensors_legacy.pth"), "rb").read()
    (tmp_path / "cut.pth").write_bytes(raw[:-10])
    with pytest.raises(InputError, match="ends inside a tensor's data: the file is truncated"):
      torch_file.read_torch_file(tmp_path / "cut.pth")


def test_fid_of_a_run_against_its_data(tiny_run, tmp_path):
  """run_sample.py --mode fid's library side on configs/tiny.py (seeded Inception weights): the data's
  statistics and features are written and, passed back as the reference, give the same FID and
  precision/recall, for each checkpoint in turn (--fid_steps); bad references and steps are
  one-line errors."""
  from jaxdiff import evaluate, fid

  with open(os.path.join(HERE, "layout.json")) as f:
    np.savez(tmp_path / "inception.npz", **_maker().seeded_state_dict(json.load(f)))
  config, workdir = tiny_run
  kw = dict(inception_path=str(tmp_path / "inception.npz"), num_samples=8, method="ddim", num_steps=2,
            feature_batch=8, out_dir=str(tmp_path / "eval"))
  first = fid.evaluate_fid(config, workdir, num_ref=8, metrics=["kid", "prdc"], **kw)
  with open(first["path"]) as f:
    saved = json.load(f)
  assert os.path.basename(first["path"]) == "fid_ddim_2nfe_step2_seed0.json"
  assert saved["fid"] == first["fid"] > 0 and saved["num_samples"] == 8 and saved["ref_n"] == 8
  assert 1.0 <= saved["inception_score"] <= inception.CLASSES and saved["is_splits"] == 8
  assert saved["kid_subset_size"] == 8 and np.isfinite(saved["kid"]) and saved["kid_std"] >= 0
  assert all(0 <= saved[k] <= 1 for k in ("precision", "recall", "coverage")) and saved["density"] >= 0
  assert saved["ref"].endswith("fid_stats_shapes_train_8_feats.npz"), saved["ref"]
  mu, sigma, feats = fid.load_statistics(saved["ref"], features=True)
  assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and feats.shape == (8, 2048)
  np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-6, atol=1e-9)
  # every checkpoint (steps 1, 2) against the saved features, watching: both are there and 2 is the run's
  # last, so it returns at once. Step 2's numbers again, step 1's its own.
  curve = fid.evaluate_fid_steps(config, workdir, steps="all", ref=saved["ref"], metrics=["prdc"], watch_s=60, **kw)
  assert curve["steps"] == [1, 2] and "kid" not in curve and curve["ref"] == saved["ref"]
  assert all(curve[k][1] == first[k] for k in ("fid", "inception_score", "precision", "recall", "density"))
  assert curve["fid"][0] != curve["fid"][1]
  assert os.path.basename(curve["results"][0]) == "fid_ddim_2nfe_step1_seed0.json"
  with open(curve["path"]) as f:
    assert json.load(f)["coverage"] == curve["coverage"] and curve["path"].endswith("fid_curve_ddim_2nfe_seed0.json")
  with pytest.raises(InputError, match=r"--fid_steps=2,3 names steps \[3\] the run did not keep; its checkpoints "
                                       r"are at steps \[1, 2\]"):
    fid.evaluate_fid_steps(config, workdir, steps=["2", "3"], **kw)
  with pytest.raises(InputError, match=r"--fid_steps=last must be 'all' or checkpoint steps"):
    fid.evaluate_fid_steps(config, workdir, steps=["last"], **kw)
  with pytest.raises(InputError, match=r"--fid_watch=5 scores checkpoints as training writes them: give "
                                       r"--fid_steps=all, not --fid_steps=2"):
    fid.evaluate_fid_steps(config, workdir, steps=[2], watch_s=5, **kw)

  plain = fid.save_statistics(str(tmp_path / "plain.npz"), mu, sigma)  # pytorch-fid's: no features
  with pytest.raises(InputError, match=r"holds only the data's mean and covariance; KID and precision/recall"):
    fid.evaluate_fid(config, workdir, ref=plain, metrics=["kid"], **kw)
  with pytest.raises(InputError, match=r"--fid_metrics=kid,fd names \['fd'\]; the metrics besides"):
    fid.evaluate_fid(config, workdir, metrics=["kid", "fd"], **kw)

  self_fid = evaluate.frechet_distance_from_statistics(mu, sigma, mu, sigma)
  assert abs(self_fid) < 1e-5 * np.trace(sigma), (self_fid, np.trace(sigma))  # rank 7 of 2048: rounding only
  np.savez(tmp_path / "bad.npz", mu=mu[:10], sigma=sigma[:10, :10])
  with pytest.raises(InputError, match=r"holds statistics of shapes \(10,\) and \(10, 10\)"):
    fid.load_statistics(str(tmp_path / "bad.npz"))
  with pytest.raises(InputError, match=r"--fid_ref='nope.npz' is not a file"):
    fid.evaluate_fid(config, workdir, ref="nope.npz", **kw)


def test_fid_watch_scores_checkpoints_as_they_appear():
  """watch_steps: each new checkpoint once and in order, older ones passed over, until the run's last
  step or `timeout_s` without a new one; it sleeps `poll_s` between listings."""
  from jaxdiff import fid

  def run(listings, final, timeout_s=100.0):
    now, slept, it = [0.0], [], iter(listings)

    def sleep(s):
      slept.append(s)
      now[0] += s

    def listing():
      return next(it, listings[-1])

    steps = list(fid.watch_steps(listing, final, poll_s=10.0, timeout_s=timeout_s, sleep=sleep, clock=lambda: now[0]))
    return steps, len(slept)

  # training writes 2, then 4 (deleting 2), then 6 and 8; 3 appears late and is passed over
  assert run([[2], [2], [4], [3, 4, 6], [6, 8]], final=8) == ([2, 4, 6, 8], 4)
  assert run([[], [], [5, 10]], final=10) == ([5, 10], 2)  # nothing yet, then the last step: done
  assert run([[10]], final=10) == ([10], 0)  # a finished run: no waiting
  assert run([[2]], final=10, timeout_s=35.0) == ([2], 4)  # stuck: stops after 40 s > 35 s without a new step


def test_fid_watch_waits_for_the_run_to_start(tmp_path):
  """An evaluation job started before training waits for the run's config.json (run_sample.py
  --fid_watch without --config), and gives up after the timeout with an error saying why."""
  from jaxdiff import configs as config_lib
  from jaxdiff import fid

  now, slept = [0.0], []

  def sleep(s):
    slept.append(s)
    now[0] += s
    if len(slept) == 3:  # training starts
      c = config_lib.base_config()
      c.training.num_steps = 77
      (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))

  config = fid.wait_for_run_config(str(tmp_path), poll_s=5.0, timeout_s=60.0, sleep=sleep, clock=lambda: now[0])
  assert config.training.num_steps == 77 and slept == [5.0] * 3
  with pytest.raises(InputError, match=r"training wrote no config.json within --fid_watch_timeout=12s"):
    fid.wait_for_run_config(str(tmp_path / "none"), poll_s=5.0, timeout_s=12.0, sleep=sleep, clock=lambda: now[0])


def _gaussian_kernel_mean(mx, sx, my, sy):
  """E[(x . y / d + 1)^3] for independent x ~ N(mx, sx), y ~ N(my, sy): s = x . y has E s = mx . my,
  E s^2 = tr((sx + mx mx^T)(sy + my my^T)) and, given y, s ~ N(mx . y, y^T sx y), so E s^3 =
  m^3 + 3 m (mx^T sy mx + my^T sx my + tr(sx sy)) + 6 mx^T sy sx my with m = mx . my."""
  d, m = len(mx), mx @ my
  s2 = np.trace((sx + np.outer(mx, mx)) @ (sy + np.outer(my, my)))
  s3 = m ** 3 + 3 * m * (mx @ sy @ mx + my @ sx @ my + np.trace(sx @ sy)) + 6 * mx @ sy @ sx @ my
  return 1 + 3 * m / d + 3 * s2 / d ** 2 + s3 / d ** 3


def test_kid_is_the_unbiased_mmd_of_its_kernel():
  """KID's subset estimate is unbiased: averaged over independent draws it equals the closed-form
  MMD^2 of two 4-D Gaussians under (x . y / d + 1)^3, and 0 for equal ones (with the kernel's
  diagonal left in, the estimate would be ~3.0 here, not 1.02)."""
  from jaxdiff import fid

  rng, d, m, reps = np.random.default_rng(0), 4, 10, 1000
  gauss = []
  for _ in range(2):
    a = rng.normal(size=(d, d)) * 0.5
    gauss.append((rng.normal(size=d) * 0.3, a @ a.T + 0.2 * np.eye(d)))
  (mx, sx), (my, sy) = gauss
  exact = (_gaussian_kernel_mean(mx, sx, mx, sx) + _gaussian_kernel_mean(my, sy, my, sy)
           - 2 * _gaussian_kernel_mean(mx, sx, my, sy))
  for (ma, sa), want in (((my, sy), exact), ((mx, sx), 0.0)):
    draws = [fid.kernel_inception_distance(rng.multivariate_normal(mx, sx, m), rng.multivariate_normal(ma, sa, m),
                                           subsets=1, subset_size=m, seed=r)[0] for r in range(reps)]
    se = np.std(draws) / np.sqrt(reps)
    assert abs(np.mean(draws) - want) < 4 * se, (np.mean(draws), want, se)
  assert exact > 15 * se
  # constant sets: k = (3/3 + 1)^3 = 8 within the first, (12/3 + 1)^3 = 125 within the second, 27 across
  mean, std = fid.kernel_inception_distance(np.ones((30, 3)), np.ones((40, 3)) * 2, subsets=7)
  assert np.isclose(mean, 8 + 125 - 2 * 27, rtol=1e-6) and std < 1e-4, (mean, std)
  with pytest.raises(InputError, match=r"subsets=1, subset_size=1000 with 1 real"):
    fid.kernel_inception_distance(np.ones((1, 3)), np.ones((5, 3)), subsets=1)


def _prdc_by_brute_force(real, fake, k, dc_k):
  dist = lambda a, b: np.sqrt(np.sum((a[:, None].astype(np.float64) - b[None]) ** 2, -1))
  within = np.sort(dist(real, real), 1)  # column 0: the point itself
  radius_fake = np.sort(dist(fake, fake), 1)[:, k]
  cross = dist(fake, real)  # [M, N]
  return {"precision": np.mean(np.any(cross <= within[None, :, k], 1)),
          "recall": np.mean(np.any(cross <= radius_fake[:, None], 0)),
          "density": np.sum(cross <= within[None, :, dc_k]) / (dc_k * len(fake)),
          "coverage": np.mean(np.min(cross, 0) <= within[:, dc_k])}


def test_precision_recall_density_coverage():
  """precision_recall equals a brute-force reading of the definitions (blocks padded at the end),
  and reads mode dropping as such: fakes from 2 of the data's 4 clusters keep precision and
  density, and halve recall and coverage."""
  from jaxdiff import fid

  rng = np.random.default_rng(0)
  real, fake = rng.normal(size=(300, 8)), rng.normal(size=(211, 8)) * 1.3 + 0.2
  got, want = fid.precision_recall(real, fake, block=64), _prdc_by_brute_force(real, fake, 3, 5)
  for name in want:
    assert abs(got[name] - want[name]) <= 1.01 / 211, (name, got[name], want[name])

  centers = np.eye(8)[:4] * 20.0
  data = lambda clusters, n: (centers[clusters][:, None] + rng.normal(size=(len(clusters), n, 8))).reshape(-1, 8)
  real = data([0, 1, 2, 3], 300)
  matched, dropped = (fid.precision_recall(real, data(c, 300)) for c in ([0, 1, 2, 3], [0, 1]))
  assert 0.6 < matched["precision"] and 0.6 < matched["recall"] and 0.8 < matched["density"] < 1.2
  assert abs(dropped["precision"] - matched["precision"]) < 0.05 and dropped["recall"] <= 0.5
  assert abs(dropped["density"] - matched["density"]) < 0.1 and dropped["coverage"] <= 0.5
  assert abs(dropped["recall"] - matched["recall"] / 2) < 0.05
  with pytest.raises(InputError, match=r"k=300 must be >= 1 and below both set sizes \(1200 real, 300 fake\)"):
    fid.precision_recall(real, real[:300], k=300)
  with pytest.raises(InputError, match=r"takes features \[N, d\] and \[M, d\]; got \(1200, 8\) and \(5, 7\)"):
    fid.precision_recall(real, real[:5, :7])

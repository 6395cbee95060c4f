"""Class-conditional networks, label dropout, classifier training, and guided sampling end to end."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, load_config
from jaxdiff import configs as config_lib
from jaxdiff import fid, generate, losses, processes, train
from jaxdiff.errors import ConfigError, InputError
from jaxdiff.models import MLP, NoiseClassifier, UNet

TINY = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4)


def _count(tree):
  return sum(math.prod(p.shape) for p in jax.tree.leaves(tree))


def _random_params(net, *args, scale=0.3):
  """Random parameters of `net.init`'s structure (the DDPM init zeroes residual outputs)."""
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), *args, train=False))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


def test_label_embedding_of_the_unet():
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 3)).repeat(4, axis=0)  # one image, 4 labels
  t = jnp.full((4,), 10.0)
  cond, uncond = UNet(**TINY, num_classes=3), UNet(**TINY)
  params = _random_params(cond, x, t)
  plain = jax.eval_shape(lambda: uncond.init(jax.random.key(0), x, t, train=False))["params"]
  # num_classes=0 is exactly the unconditional network; K > 0 adds one (K + 1) x 4ch table
  assert params["label_embed"]["embedding"].shape == (4, 32)
  assert jax.tree.map(jnp.shape, {k: v for k, v in params.items() if k != "label_embed"}) == \
      jax.tree.map(jnp.shape, plain)
  assert _count(params) - _count(plain) == 4 * 32

  @jax.jit
  def outs(params):
    apply = lambda y: cond.apply({"params": params}, x, t, y, train=False)  # noqa: E731
    return apply(jnp.arange(4, dtype=jnp.int32)), apply(None), apply(jnp.int32(1))

  per_label, none, scalar = outs(params)
  for i in range(4):
    for j in range(i):
      assert float(jnp.max(jnp.abs(per_label[i] - per_label[j]))) > 1e-3, (i, j)  # 3 = the null label
  np.testing.assert_allclose(none, jnp.broadcast_to(per_label[3], none.shape), atol=1e-6)
  np.testing.assert_allclose(scalar, jnp.broadcast_to(per_label[1], scalar.shape), atol=1e-6)

  with pytest.raises(InputError, match="UNet got labels y, but num_classes=0"):
    jax.eval_shape(lambda p: uncond.apply({"params": p}, x, t, jnp.zeros(4, jnp.int32), train=False), plain)
  with pytest.raises(InputError, match="labels y must be integers"):
    jax.eval_shape(lambda: cond.apply({"params": params}, x, t, jnp.zeros(4), train=False))
  with pytest.raises(InputError, match=r"y.shape=\(3,\) must be \[B\]=\(4,\)"):
    jax.eval_shape(lambda: cond.apply({"params": params}, x, t, jnp.zeros(3, jnp.int32), train=False))


def test_label_embedding_of_the_mlp():
  x, t = jnp.ones((3, 2)), jnp.ones((3,))
  mlp = MLP(hidden=16, num_layers=1, time_dim=8, num_classes=8)
  params = _random_params(mlp, x, t)
  assert params["Embed_0"]["embedding"].shape == (9, 16)
  apply = jax.jit(lambda p, y: mlp.apply({"params": p}, x, t, y))
  assert float(jnp.max(jnp.abs(apply(params, jnp.array([0, 1, 2])) - apply(params, None)))) > 1e-3
  np.testing.assert_allclose(apply(params, None), apply(params, jnp.full((3,), 8, jnp.int32)), atol=1e-6)
  plain = MLP(hidden=16, num_layers=1, time_dim=8)
  with pytest.raises(InputError, match="MLP got labels y, but num_classes=0"):
    jax.eval_shape(lambda: plain.init(jax.random.key(0), x, t, jnp.zeros(3, jnp.int32)))


SEEN = []  # the labels Probe was called with


class Probe(nn.Module):
  """A 'network' that records the labels the train step gives it."""

  num_classes: int = 5

  @nn.compact
  def __call__(self, x, t, y=None, *, train=False):
    jax.debug.callback(lambda v: SEEN.append(np.asarray(v)), y)
    return x * self.param("w", nn.initializers.zeros, ())


@pytest.mark.parametrize("rate", [0.1, 0.0])
def test_label_dropout_replaces_labels_by_the_null_label(rate):
  seen = SEEN
  model = Probe()
  opt = train.make_optimizer(learning_rate=1e-3)
  state = train.create_train_state(jax.random.key(0), model=model, optimizer=opt, example_x=jnp.zeros((1, 2)))
  n = 8192
  labels = jnp.arange(n, dtype=jnp.int32) % 5
  batch = {"x": jnp.ones((n, 2)), "label": labels}
  step = jax.jit(lambda s, k: train.train_step(s, batch, k, model=model, loss_fn=losses.make_denoising_loss(
      processes.VP()), optimizer=opt, ema_decay=0.9, label_dropout=rate))
  masks = []
  for i in (0, 1, 0):
    seen.clear()
    step(state, jax.random.fold_in(jax.random.key(7), i))
    y = seen[-1]
    dropped = y == 5
    np.testing.assert_array_equal(y[~dropped], np.asarray(labels)[~dropped])  # the others untouched
    masks.append(dropped)
    assert abs(dropped.mean() - rate) < 4 * math.sqrt(rate * (1 - rate) / n) + 1e-9, dropped.mean()
  if rate:
    assert (masks[0] != masks[1]).any()  # a fresh draw every step (fold_in of the step key)
  np.testing.assert_array_equal(masks[0], masks[2])  # and a pure function of it


def test_config_validation_of_labels_and_guidance():
  def cfg(name="mnist_cond", arg="runlocal", **sections):
    c = load_config(name, arg)
    for section, values in sections.items():
      c[section].update(values)
    return c

  cases = [
      (cfg(data=dict(use_labels=False)), r"num_classes=10 makes a class-conditional model, which needs labels"),
      (cfg(model=dict(num_classes=5)), r"num_classes=5 but 'mnist' has 10 classes; set --config.model.num_classes=10"),
      (cfg(training=dict(label_dropout=1.0)), r"label_dropout=1.0 must be in \[0, 1\)"),
      (cfg(sampling=dict(guidance_rescale=2.0)), r"config.sampling.guidance_rescale=2.0 must be in \[0, 1\]"),
      (cfg(sampling=dict(guidance_interval=(3.0, 1.0))), r"guidance_interval=\(3.0, 1.0\) must be \(lo, hi\)"),
      (cfg("mnist_classifier", "", model=dict(num_classes=1)), r"'classifier' needs config.model.num_classes >= 2"),
      (cfg("mnist_classifier", "", loss=dict(t_sampling="lognormal")), r"t_sampling='lognormal' is not known for a"),
  ]
  for c, match in cases:
    with pytest.raises(ConfigError, match=match):
      config_lib.validate(c)
  with pytest.raises(ConfigError, match=r"use_labels=True but config.model.num_classes=0 .*num_classes=3"):
    train.build_experiment(cfg("tiny", None, data=dict(use_labels=True)))
  for name, args in [("mnist_cond", (None, "runlocal", "tiny")), ("cifar10_cond", (None, "runlocal")),
                     ("mnist_classifier", ("", "clean", "tiny", "clean,tiny"))]:
    for arg in args:
      config_lib.validate(load_config(name, arg))


def test_classifier_network_and_compatibility_checks():
  clf_exp = train.build_experiment(load_config("mnist_classifier", "tiny"))
  exp = train.build_experiment(load_config("mnist_cond", "tiny"))
  assert clf_exp.is_classifier and clf_exp.num_classes == 10 and not exp.is_classifier
  x, t, clf = jnp.zeros((2, 28, 28, 1)), jnp.zeros(2), clf_exp.model
  logits = jax.eval_shape(lambda: clf.apply(clf.init(jax.random.key(0), x, t, train=False), x, t, train=False))
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  generate.check_classifier(exp, clf_exp)  # compatible
  with pytest.raises(InputError, match="has 5 classes but the model is conditional on 10"):
    generate.check_classifier(exp, clf_exp.replace(model=clf_exp.model.clone(num_classes=5)))
  with pytest.raises(InputError, match="different process"):
    generate.check_classifier(exp, clf_exp.replace(process=processes.DDPM.linear(1000)))
  with pytest.raises(InputError, match="is a UNet, not a noise-conditional classifier"):
    generate.check_classifier(exp, exp)
  with pytest.raises(InputError, match=r"trained on data of shape \(8, 8, 3\)"):
    generate.check_classifier(exp, train.build_experiment(load_config("tiny")).replace(
        model=NoiseClassifier(num_classes=10)))


# --------------------------------------------------------------------------------------
# End to end on MNIST: tiny runs of a conditional model and a classifier, a few steps each
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tfds_dir, tmp_path_factory):
  """(config, workdir) of mnist_dit:tiny and mnist_classifier:tiny, 4 steps each.

  The conditional model is a DiT, so that the transformer runs end to end (training, guided
  sampling, the CLI); the U-Net's label embedding is tested above, and the two share every
  other line of the conditional pipeline.
  """
  out = {}
  for key, name, arg in [("cond", "mnist_dit", "tiny"), ("clf", "mnist_classifier", "tiny")]:
    c = load_config(name, arg)
    c.data.data_dir = tfds_dir
    workdir = str(tmp_path_factory.mktemp(key))
    train.train_and_evaluate(c, workdir)
    out[key] = (c, workdir)
  return out


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_training_a_conditional_model_and_a_classifier(runs):
  c, workdir = runs["cond"]
  assert os.path.getsize(os.path.join(workdir, "samples_000004.png")) > 0
  assert all(np.isfinite(r["loss"]) for r in _metrics(workdir))
  _, clf_dir = runs["clf"]
  rows = _metrics(clf_dir)
  assert [r["step"] for r in rows] == [2, 4] and all(0 <= r["accuracy"] <= 1 for r in rows)
  assert rows[0]["loss"] > 0.5 * math.log(10)  # cross-entropy of a fresh 10-class classifier
  assert not [f for f in os.listdir(clf_dir) if f.startswith("samples")]  # classifiers draw nothing


def test_generate_with_classifier_guidance(runs, tmp_path):
  c, workdir = runs["cond"]
  _, clf_dir = runs["clf"]
  out = generate.generate(c, workdir, labels=["3"], guidance_scale=0.0, classifier_workdir=clf_dir,
                          classifier_scale=2.0, num_samples=8, out_dir=str(tmp_path))
  assert out["paths"]["png"].endswith("ddim_4nfe_step4_seed0_cg2.png") and out["classifier_scale"] == 2.0
  npz = np.load(out["paths"]["npz"])
  assert npz["images"].shape == (8, 28, 28, 1)
  np.testing.assert_array_equal(npz["labels"], [3] * 8)


def test_generate_bad_inputs(runs):
  c, workdir = runs["cond"]
  clf_config, clf_dir = runs["clf"]
  unconditional = load_config("tiny")
  cases = [
      (c, dict(labels=["10"]), r"--labels=10: label 10 is out of range for 10 classes; use 0..9 or null"),
      (c, dict(labels=["one"]), r"'one' is not an integer class label"),
      (unconditional, dict(guidance_scale=3.0), r"--guidance_scale=3 needs a class-conditional model"),
      (unconditional, dict(labels=["1"]), r"--labels=1 were given but .* is an unconditional model"),
      (c, dict(classifier_scale=2.0), r"--classifier_scale=2 needs --classifier_workdir"),
      (c, dict(classifier_workdir=workdir, labels=["1"]), r"holds a DiT .*not a classifier"),
      (c, dict(classifier_workdir=clf_dir), r"--classifier_workdir needs --labels"),
  ]
  for config, kw, match in cases:
    with pytest.raises(InputError, match=match):
      generate.generate(config, workdir, num_samples=8, **kw)
  with pytest.raises(InputError, match="holds a noise-conditional classifier, which does not draw samples"):
    generate.generate(clf_config, clf_dir)
  with pytest.raises(InputError, match="holds a noise-conditional classifier, which does not draw samples"):
    fid.evaluate_fid(clf_config, clf_dir, inception_path="not_read.pth")  # refused before any weights or data


def test_run_sample_cli_with_labels_and_guidance(runs, tmp_path):
  _, workdir = runs["cond"]

  def run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "run_sample.py"), "--workdir", workdir,
                           "--num_samples", "10", "--out_dir", str(tmp_path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)

  proc = run("--labels", "0,1,null", "--guidance_scale", "3.0")  # null: the unconditional model
  assert proc.returncode == 0, proc.stderr[-2000:]
  npz = np.load(tmp_path / "ddim_4nfe_step4_seed0_cfg3.npz")
  assert npz["images"].shape == (10, 28, 28, 1)
  np.testing.assert_array_equal(npz["labels"], [0, 1, 10, 0, 1, 10, 0, 1, 10, 0])  # cycled
  proc = run("--labels", "0,12")
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(err) == 1, proc.stderr[-2000:]
  assert err[0].startswith("error: InputError: --labels=0,12: label 12 is out of range"), err


def test_mnist_eval_script_runs(runs):
  """The plumbing of benchmarks/cond_mnist_eval.py (the measured run is in configs/mnist_cond.py)."""
  spec = importlib.util.spec_from_file_location("cond_mnist_eval", os.path.join(ROOT, "benchmarks",
                                                                                "cond_mnist_eval.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  (_, workdir), (_, clf_dir) = runs["cond"], runs["clf"]
  out = mod.run(workdir, clf_dir, guidance_scales=(3.0,), num_samples=10, batch_size=8, num_test=16,
                img2img_strengths=(0.5,), inpaint_rows=14)
  assert set(out["settings"]) == {"cfg_w3", "unconditional"}
  inp = out["inpaint"]
  assert inp["n"] == 10 and inp["keep_rows"] == 14 and 0.0 <= inp["masked_input"] <= 1.0
  assert {k: 0.0 <= inp[k]["original"] <= 1.0 for k in ("null", "w3")} == {"null": True, "w3": True}
  edit = out["img2img"]["s0.5_w3"]
  assert edit["n"] == 10 and 0.0 <= edit["to_target"] <= 1.0 and 0.0 <= edit["kept_original"] <= 1.0
  for s in out["settings"].values():
    assert s["n"] == 10 and 0.0 <= s["accuracy"] <= 1.0 and len(s["per_class"]) == 10
    assert s["nfe"] == 4 and s["classifier_fd"] > 0.0  # ddim: 4 grid points, 3 steps + the denoising step
    assert np.isfinite(s["classifier_kid"]) and 0.0 <= s["classifier_prdc"]["recall"] <= 1.0
  assert 0.0 <= out["classifier_test_accuracy"] <= 1.0


def test_frechet_distance_matches_the_gaussian_closed_form():
  """For N(m1, diag(a)) and N(m2, diag(b)): |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2; and for
  full covariances that commute with a rotation, the same after rotating both."""
  from jaxdiff import evaluate

  rng = np.random.default_rng(0)
  d, n = 6, 200_000
  m1, m2 = rng.normal(size=d), rng.normal(size=d)
  a, b = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # a random rotation: covariances q diag q^T
  x = (m1 + rng.normal(size=(n, d)) * np.sqrt(a)) @ q.T
  y = (m2 + rng.normal(size=(n, d)) * np.sqrt(b)) @ q.T
  exact = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(evaluate.frechet_distance(x, y), exact, rtol=0.02)
  assert abs(evaluate.frechet_distance(x, x)) < 1e-8
  with pytest.raises(InputError, match="frechet_distance"):
    evaluate.frechet_distance(x[:, :3], y)

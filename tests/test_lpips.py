"""LPIPS equals the lpips package's network, its weights load from either layout, and it is a
well-behaved training loss (zero on equal images, finite gradients)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.errors import InputError
from jaxdiff.models import lpips

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _maker():
  spec = importlib.util.spec_from_file_location("make_lpips_fixture", os.path.join(FIXTURES, "make_lpips_fixture.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def seeded():
  return _maker().seeded_state_dict()


def test_lpips_matches_the_lpips_package(seeded, tmp_path):
  """lpips.LPIPS(net='vgg', version='0.1') on seeded weights (tests/fixtures/make_lpips_fixture.py):
  the same distance at the images' own size, and for grey images repeated to RGB and resized to
  224 as consistency models' code does. The weights load from torchvision's VGG file plus the
  lpips package's linear layers (two files) or from one state dict of the lpips module."""
  io = np.load(os.path.join(FIXTURES, "lpips", "io.npz"))
  vgg = {k: v for k, v in seeded.items() if k.startswith("features.")}
  np.savez(tmp_path / "vgg.npz", **vgg, **{"classifier.0.weight": np.zeros((4, 3), np.float32)})
  np.savez(tmp_path / "lin.npz", **{k: v for k, v in seeded.items() if k.startswith("lin")})
  params = lpips.load_lpips(tmp_path / "vgg.npz", tmp_path / "lin.npz")

  d = jax.jit(lambda a, b: lpips.lpips_distance(params, a, b, resolution=None))(io["a"], io["b"])
  np.testing.assert_allclose(d, io["d"], rtol=2e-5)
  d224 = jax.jit(lambda a, b: lpips.lpips_distance(params, a, b))(io["g"], io["h"])
  np.testing.assert_allclose(d224, io["d224"], rtol=2e-5)
  assert abs(float(d[0]) - float(d[1])) > 1e-3 * float(d[0])  # two different pairs

  # the lpips module's own state dict: net.slice<k>.<torchvision index>, lin<k>, lins.<k> aliases
  starts = (0, 4, 9, 16, 23)
  whole = {f"net.slice{sum(int(k.split('.')[1]) >= s for s in starts)}.{k[len('features.'):]}": v
           for k, v in vgg.items()}
  whole.update({k: v for k, v in seeded.items() if k.startswith("lin")})
  whole.update({k.replace("lin", "lins.", 1): v for k, v in seeded.items() if k.startswith("lin")})
  again = lpips.convert_lpips_state_dict({**whole, "scaling_layer.shift": np.zeros((1, 3, 1, 1))})
  assert jax.tree.all(jax.tree.map(np.array_equal, again, params))

  with pytest.raises(InputError, match=r"lack 5 tensor\(s\), e.g. \['lin0/kernel', 'lin1/kernel'\]: give the "
                                       r"lpips package's linear layers"):
    lpips.load_lpips(tmp_path / "vgg.npz")
  with pytest.raises(InputError, match=r"'nope.pth' are not a file; download torchvision's VGG-16"):
    lpips.load_lpips(tmp_path / "vgg.npz", "nope.pth")
  with pytest.raises(InputError, match=r"needs images of at least 16x16 \(VGG-16 pools four times\); got 8x8"):
    lpips.lpips_distance(params, io["a"][:, :8, :8], io["b"][:, :8, :8], resolution=None)
  with pytest.raises(InputError, match=r"two image batches \[B, H, W, 1 or 3\] of one shape"):
    lpips.lpips_distance(params, io["a"], io["g"])


def test_lpips_is_a_usable_loss(seeded):
  """Zero between equal images, positive otherwise, and finite gradients, also where a ReLU stage
  is all zero (relu1_2, its biases pushed down), whose unit-length step has a NaN gradient."""
  params = lpips.convert_lpips_state_dict(seeded)
  dead = jax.tree.map(lambda v: v, params)
  dead["conv0"]["bias"] = dead["conv0"]["bias"] - 100.0
  dead["conv1"]["bias"] = dead["conv1"]["bias"] - 100.0
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  b = -jnp.ones_like(a)
  dist = jax.jit(lambda p, x, y: jnp.sum(lpips.lpips_distance(p, x, y, resolution=None)))
  grad = jax.jit(jax.grad(lambda p, x, y: jnp.sum(lpips.lpips_distance(p, x, y, resolution=None)), argnums=1))
  assert float(dist(params, a, a)) == 0.0 and float(dist(params, a, b)) > 0
  for p in (params, dead):
    for x, y in ((a, a), (a, b)):
      assert bool(jnp.all(jnp.isfinite(grad(p, x, y))))


def test_consistency_losses_take_lpips(seeded):
  """metric='lpips' in both consistency losses: the images mapped from the data range to [-1, 1]
  and resized, the weights as the loss's metric_params (an error without them)."""
  from jaxdiff import losses
  from jaxdiff.errors import ConfigError

  params = lpips.convert_lpips_state_dict(seeded)
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.uniform(0, 1, (2, 12, 12, 1)), jnp.float32) for _ in range(2))
  distance = losses._consistency_metric("lpips", "mean", 16, (0.0, 1.0), "config.loss.metric='lpips'")
  want = lpips.lpips_distance(params, 2 * a - 1, 2 * b - 1, resolution=16)
  np.testing.assert_allclose(distance(a, b, params), want, rtol=1e-6)
  with pytest.raises(ConfigError, match=r"config.loss.metric='lpips' needs the LPIPS weights as the loss's"):
    distance(a, b, None)


def test_consistency_training_with_lpips(tfds_dir, seeded, tmp_path):
  """configs/mnist_ct.py:tiny with config.loss.metric='lpips' (seeded weights, the digits' own
  28x28) trains on 8 devices: the loop passes the weights to each step (the loss raises without
  them). Missing weights, latents and too small images are config errors naming the fix."""
  from conftest import load_config
  from jaxdiff import configs as config_lib
  from jaxdiff import train
  from jaxdiff.errors import ConfigError

  np.savez(tmp_path / "lpips.npz", **seeded)
  config = load_config("mnist_ct", "tiny")
  config.data.data_dir = tfds_dir
  config.loss.metric = "lpips"
  config.lpips.update(weights=str(tmp_path / "lpips.npz"), resolution=0)
  config.training.update(num_steps=2, num_final_samples=0)
  config_lib.validate(config)
  out = train.train_and_evaluate(config, str(tmp_path / "ct"))
  assert np.isfinite(out["loss"]) and out["loss"] > 0

  def error(metric_key="loss", **lpips_fields):
    c = load_config("mnist_ct", "tiny") if metric_key == "loss" else load_config("mnist_distill", "tiny_consistency")
    c[metric_key].metric = "lpips"
    c.lpips.update(**{"weights": "w.pth", **lpips_fields})
    return c

  with pytest.raises(ConfigError, match=r"config.loss.metric='lpips' needs the LPIPS weights: set "
                                        r"--config.lpips.weights=vgg16-397923af.pth,vgg.pth"):
    config_lib.validate(error(weights=""))
  with pytest.raises(ConfigError, match=r"config.lpips.resolution=8 with 28x28 images: VGG-16 pools four times"):
    config_lib.validate(error(resolution=8))
  c = error("distill")
  c.distill.teacher, c.latent.autoencoder = "/teacher", "jaxdiff:/autoencoder"
  with pytest.raises(ConfigError, match=r"config.distill.metric='lpips' compares images through VGG-16, but this "
                                        r"model's outputs are latents"):
    config_lib._validate_lpips(c)

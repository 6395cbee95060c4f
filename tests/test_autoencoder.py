"""AutoencoderKL: diffusers' encode / decode, the converter, latents, gradients, errors, and a
latent DiT sampled and decoded end to end.

The fixture tests/fixtures/diffusers_vae_tiny holds a tiny random diffusers AutoencoderKL with
images, their posterior mean / log-variance, latents and their decoding;
tests/fixtures/make_diffusers_vae_fixture.py made it.
"""

from __future__ import annotations

import json
import os

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import guidance, processes
from jaxdiff.errors import ConfigError, InputError
from jaxdiff.models import DiT, convert_diffusers
from jaxdiff.models.autoencoder import AutoencoderKL, decode_latents, encode_latents, kl_divergence

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FIXTURE = os.path.join(FIXTURES, "diffusers_vae_tiny")
TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


def _nhwc(a):
  return jnp.asarray(a.transpose(0, 2, 3, 1))


def _fixture():
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  with open(os.path.join(FIXTURE, "config.json")) as f:
    config = json.load(f)
  sd = safetensors_numpy.load_file(os.path.join(FIXTURE, convert_diffusers.WEIGHTS_NAME))
  return config, sd, dict(np.load(os.path.join(FIXTURE, "io.npz")))


def test_matches_diffusers_vae():
  _, _, io = _fixture()
  kwargs, params = convert_diffusers.load_diffusers_vae(FIXTURE)
  assert kwargs["block_out_channels"] == (8, 16) and kwargs["scaling_factor"] == 0.18215
  vae = AutoencoderKL(**kwargs)
  shifted = AutoencoderKL(**{**kwargs, "shift_factor": 0.5})

  @jax.jit
  def run(p, x, z):
    mean, logvar = vae.apply({"params": p}, x, method=AutoencoderKL.encode)
    decoded = vae.apply({"params": p}, z, method=AutoencoderKL.decode)
    return dict(mean=mean, logvar=logvar, decoded=decoded, latents=encode_latents(vae, p, x),
                shifted=encode_latents(shifted, p, x), keyed=encode_latents(vae, p, x, jax.random.key(3)),
                back=decode_latents(vae, p, 0.18215 * z))

  out = run(params, _nhwc(io["x"]), _nhwc(io["z"]))
  assert out["mean"].shape == (2, 8, 8, 4) and out["decoded"].shape == (2, 16, 16, 3)
  for name in ("mean", "logvar", "decoded"):
    want = io[name].transpose(0, 2, 3, 1)
    assert np.max(np.abs(np.asarray(out[name]) - want)) < 1e-4 * max(1.0, np.abs(want).max()), name
  # Deterministic latents are the scaled (shifted) mean; decode_latents undoes the scaling.
  mean, logvar = out["mean"], out["logvar"]
  np.testing.assert_allclose(out["latents"], 0.18215 * mean, rtol=1e-6)
  np.testing.assert_allclose(out["shifted"], 0.18215 * (mean - 0.5), atol=1e-6)
  np.testing.assert_allclose(out["back"], out["decoded"], atol=1e-5)
  # With a key, latents are samples of q(z|x): mean + exp(logvar / 2) * noise.
  noise = (out["keyed"] / 0.18215 - mean) / jnp.exp(0.5 * logvar)
  np.testing.assert_allclose(noise, jax.random.normal(jax.random.key(3), mean.shape), atol=1e-3)


def test_converter_reads_old_names_and_refuses_what_it_cannot_hold():
  config, sd, _ = _fixture()
  _, params = convert_diffusers.load_diffusers_vae(FIXTURE)
  # Older checkpoints: query/key/value/proj_attn, stored as 1x1 convs in the LDM layout.
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed = {}
  for k, v in sd.items():
    for new, name in old.items():
      if f".attentions.0.{new}." in k:
        k = k.replace(f".{new}.", f".{name}.")
        v = v[:, :, None, None] if v.ndim == 2 else v
    renamed[k] = v
  assert any(".proj_attn.weight" in k for k in renamed)
  again = convert_diffusers.convert_diffusers_vae_state_dict(renamed, config)
  flat = lambda p: jax.flatten_util.ravel_pytree(p)[0]  # noqa: E731
  np.testing.assert_array_equal(flat(again), flat(params))

  with pytest.raises(InputError, match="lacks 1 tensors.*decoder.up_blocks.1.resnets.0.conv2.bias"):
    convert_diffusers.convert_diffusers_vae_state_dict(
        {k: v for k, v in sd.items() if k != "decoder.up_blocks.1.resnets.0.conv2.bias"}, config)
  with pytest.raises(InputError, match="up_block_types"):
    convert_diffusers.vae_kwargs_from_config({**config, "up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]})
  with pytest.raises(InputError, match="latents_mean"):
    convert_diffusers.vae_kwargs_from_config({**config, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
  with pytest.raises(InputError, match="_class_name='AutoencoderTiny'"):
    convert_diffusers.vae_kwargs_from_config({**config, "_class_name": "AutoencoderTiny"})
  with pytest.raises(InputError, match="does not exist"):
    convert_diffusers.load_diffusers_vae(FIXTURES)


def test_bad_inputs_and_configs():
  vae = AutoencoderKL(**TINY)
  shapes = jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 4, 4, 3)))  # the checks come first
  with pytest.raises(InputError, match=r"x.shape=\(1, 5, 4, 3\) must be \[B, H, W, 3\].*multiples of 2"):
    vae.apply(shapes, jnp.zeros((1, 5, 4, 3)), method=AutoencoderKL.encode)
  with pytest.raises(InputError, match=r"z.shape=\(1, 4, 4, 3\) must be \[B, H, W, 4\]"):
    vae.apply(shapes, jnp.zeros((1, 4, 4, 3)), method=AutoencoderKL.decode)
  with pytest.raises(ConfigError, match="block_out_channels=\\(8, 10\\): 10 is not a positive multiple"):
    jax.eval_shape(AutoencoderKL(**{**TINY, "block_out_channels": (8, 10)}).init, jax.random.key(0),
                   jnp.zeros((1, 4, 4, 3)))
  with pytest.raises(ConfigError, match="layers_per_block=0"):
    jax.eval_shape(AutoencoderKL(**{**TINY, "layers_per_block": 0}).init, jax.random.key(0), jnp.zeros((1, 4, 4, 3)))


def test_training_gradients_and_kl():
  # KL(N(m, s^2) || N(0, 1)) per element = (m^2 + s^2 - 1 - log s^2) / 2, summed per example.
  mean = jnp.array([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])
  logvar = jnp.array([[[[0.0, jnp.log(4.0)]]], [[[0.0, 0.0]]]])
  np.testing.assert_allclose(kl_divergence(mean, logvar), [0.5 + (4 - 1 - np.log(4)) / 2, 0.0], rtol=1e-6)

  # A VAE training loss (reconstruction + KL, z sampled) reaches every parameter.
  vae = AutoencoderKL(**TINY, mid_attention=True)
  x = jax.random.uniform(jax.random.key(1), (2, 4, 4, 3), minval=-1, maxval=1)

  @jax.jit
  def grads(key):
    params = vae.init(key, x)["params"]

    def loss(p):
      recon, m, lv = vae.apply({"params": p}, x, jax.random.key(2))
      return jnp.mean(jnp.square(recon - x)) + 1e-3 * jnp.mean(kl_divergence(m, lv))

    return jax.grad(loss)(params)

  g = grads(jax.random.key(0))
  norms = {jax.tree_util.keystr(k): float(jnp.linalg.norm(v)) for k, v in jax.tree_util.tree_leaves_with_path(g)}
  assert all(np.isfinite(list(norms.values())))
  # zero-initialised: each resnet block's conv_1 and the attention output start at 0, so the
  # gradients reaching the layers before them vanish at init; everything else gets one
  assert [k for k, n in norms.items() if n == 0 and "conv_0" not in k and "norm_0" not in k and "norm_1" not in k] == []
  assert any("quant_conv" in k for k in norms) and any("['attn']" in k for k in norms)


def test_latent_dit_sampled_and_decoded():
  """DiT-XL/2 + its VAE in miniature: DDIM with guidance on the DiT's latents, then the VAE."""
  pytest.importorskip("safetensors.numpy")
  dit_kwargs, dit_params = convert_diffusers.load_diffusers_dit(os.path.join(FIXTURES, "diffusers_dit_tiny"))
  vae_kwargs, vae_params = convert_diffusers.load_diffusers_vae(FIXTURE)
  dit, vae = DiT(**dit_kwargs), AutoencoderKL(**vae_kwargs)
  process = processes.get_process(name="ddpm", schedule="linear", num_timesteps=1000)
  net = lambda x, c, y: dit.apply({"params": dit_params}, x, c, y)  # noqa: E731
  score_fn = guidance.cfg_score_fn(net, process, "eps", jnp.array([1, 7]), 1.5, null_label=10)

  @jax.jit
  def generate(key):
    latents, info = jaxdiff.sample(key, process, score_fn, (2, 8, 8, 4), method="ddim", num_steps=4)
    return latents, decode_latents(vae, vae_params, latents), info["nfe"]

  latents, images, nfe = generate(jax.random.key(0))
  assert images.shape == (2, 16, 16, 3) and int(nfe) == 4
  assert bool(jnp.all(jnp.isfinite(images)))
  # The decoding is the VAE's decode of the unscaled latents.
  want = vae.apply({"params": vae_params}, latents / 0.18215, method=AutoencoderKL.decode)
  np.testing.assert_allclose(images, want, atol=1e-5)

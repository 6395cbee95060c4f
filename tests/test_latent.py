"""Latent diffusion from the configs: an autoencoder trained by run_train (model.name='autoencoder'),
a DiT trained and sampled in its latents (config.latent), a diffusers VAE as the autoencoder, the
autoencoder's objective, and the errors of configs that cannot work.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from jaxdiff import configs, evaluate, generate, latent, losses, sharding, tasks, train
from jaxdiff.errors import ConfigError, InputError
from jaxdiff.models.autoencoder import AutoencoderKL, decode_latents, encode_latents

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "diffusers_vae_tiny")


def test_autoencoder_loss_closed_form():
  x = jnp.linspace(-1.0, 1.0, 2 * 4 * 4 * 1).reshape(2, 4, 4, 1)
  mean = jnp.ones((2, 2, 2, 3))  # KL per latent element: (1 + 1 - 1 - 0) / 2 = 0.5 -> 6 per example
  logvar = jnp.zeros_like(mean)

  def ae(x, key):
    return x + 0.25, mean, logvar

  for rec, want_rec in (("l1", 0.25), ("l2", 0.0625)):
    loss, aux = losses.make_autoencoder_loss(kl_weight=0.5, reconstruction=rec)(ae, x, jax.random.key(0))
    np.testing.assert_allclose(float(aux["reconstruction"]), want_rec, rtol=1e-6)
    np.testing.assert_allclose(float(aux["kl"]), 6.0, rtol=1e-6)
    np.testing.assert_allclose(float(loss), want_rec + 0.5 * 6.0 / 16, rtol=1e-6)  # KL / pixels per example
  with pytest.raises(ConfigError, match="config.loss.reconstruction='l3'"):
    losses.make_autoencoder_loss(reconstruction="l3")
  with pytest.raises(ConfigError, match="config.loss.kl_weight=-1"):
    losses.make_autoencoder_loss(kl_weight=-1.0)


def test_diffusers_latent_space_encodes_and_decodes_as_the_autoencoder():
  pytest.importorskip("safetensors")
  section = {"autoencoder": f"diffusers:{FIXTURE}", "scaling_factor": 0.0, "sample_posterior": True}
  space = latent.latent_space((16, 16, 3), **section)
  assert space.shape == (8, 8, 4) and space.autoencoder.scaling_factor == pytest.approx(0.18215)
  assert latent.latent_space((16, 16, 3), **{**section, "scaling_factor": 0.5}).autoencoder.scaling_factor == 0.5
  with pytest.raises(ConfigError, match=r"encodes images, but the data are vectors of shape \(2,\)"):
    latent.latent_space((2,), **section)
  mesh = sharding.create_mesh({"data": -1})
  params = latent.load_params(space, mesh)
  x = jax.random.uniform(jax.random.key(1), (8, 16, 16, 3), minval=-1.0, maxval=1.0)
  x2 = -x[:, ::-1]
  key, step = jax.random.key(7), jnp.asarray(5, jnp.int32)
  encode = latent.make_encoder(space, mesh)
  z1, z2 = encode(params, (x, x2), key, step)
  # batch i draws with fold_in(fold_in(key, POSTERIOR_STREAM), step + i): any steps_per_call, same latents
  (z2_alone,) = encode(params, (x2,), key, step + 1)
  np.testing.assert_allclose(np.asarray(z2), np.asarray(z2_alone), rtol=1e-5, atol=1e-6)
  k1 = jax.random.fold_in(jax.random.fold_in(key, latent.POSTERIOR_STREAM), 5)
  np.testing.assert_allclose(np.asarray(z1), np.asarray(encode_latents(space.autoencoder, params, x, k1)),
                             rtol=1e-5, atol=1e-5)
  assert z1.sharding.is_equivalent_to(sharding.batch_sharding(mesh, 4), 4)
  # the posterior mean with sample_posterior=False: 0.18215 * mean
  mean_space = latent.latent_space((16, 16, 3), **{**section, "sample_posterior": False})
  (zm,) = latent.make_encoder(mean_space, mesh)(params, (x,), key, step)
  mean, _ = space.autoencoder.apply({"params": params}, x, method=AutoencoderKL.encode)
  np.testing.assert_allclose(np.asarray(zm), 0.18215 * np.asarray(mean), rtol=1e-5, atol=1e-6)
  images = latent.make_decoder(space, mesh)(params, zm)
  assert images.shape == (8, 16, 16, 3)
  np.testing.assert_allclose(np.asarray(images), np.asarray(decode_latents(space.autoencoder, params, zm)),
                             rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def runs(tfds_dir, tmp_path_factory):
  """(config, workdir) of mnist_autoencoder:tiny and of mnist_latent:tiny in its latents (2 steps per
  call), 4 steps each. The autoencoder has LDM's whole objective: LPIPS (seeded weights, the digits'
  own 28x28) and a patch discriminator from its third update on."""
  from test_lpips import _maker

  ae = load_config("mnist_autoencoder", "tiny")
  ae.data.data_dir = tfds_dir
  ae_dir = str(tmp_path_factory.mktemp("ae"))
  np.savez(os.path.join(ae_dir, "lpips.npz"), **_maker().seeded_state_dict())
  ae.lpips.update(weights=os.path.join(ae_dir, "lpips.npz"), resolution=0)
  ae.loss.update(perceptual_weight=1.0, disc_weight=0.5, disc_start=2, disc_features=8, disc_layers=2)
  ae.training.log_every = 1
  train.train_and_evaluate(ae, ae_dir)
  lat = load_config("mnist_latent", "tiny")
  lat.data.data_dir = tfds_dir
  lat.latent.autoencoder = f"jaxdiff:{ae_dir}"
  lat.training.steps_per_call = 2  # the loop encodes a tuple of batches per call
  lat_dir = str(tmp_path_factory.mktemp("latent"))
  train.train_and_evaluate(lat, lat_dir)
  return {"ae": (ae, ae_dir), "latent": (lat, lat_dir)}


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_autoencoder_run_writes_reconstructions_and_latent_statistics(runs):
  _, ae_dir = runs["ae"]
  rows = _rows(ae_dir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for r in rows:  # loss = reconstruction + LPIPS + 1e-6 KL / 784 + w * (-mean D(recon)), w = 0 until update 3
    assert r["kl"] > 0 and r["perceptual"] > 0
    assert r["loss"] == pytest.approx(r["reconstruction"] + r["perceptual"] + 1e-6 * r["kl"] / 784
                                      + r["adversarial_weight"] * r["generator_loss"], rel=1e-5)
  assert [r["adversarial_weight"] > 0 for r in rows] == [False, False, True, True]
  assert [r["disc_grad_norm"] > 0 and r["discriminator_loss"] > 0 for r in rows] == [False, False, True, True]
  stats = latent.read_stats(ae_dir)
  assert stats["step"] == 4 and stats["num_examples"] == 8 and stats["latent_std"] > 0
  assert stats["scaling_factor"] == pytest.approx(1.0 / stats["latent_std"])
  assert stats["shift_factor"] == stats["latent_mean"] and np.isfinite(stats["psnr_db"])
  assert os.path.getsize(os.path.join(ae_dir, "reconstructions_000004.png")) > 0


def test_autoencoder_eval_script_runs(runs):
  """The plumbing of benchmarks/autoencoder_eval.py (the measured runs are in configs/mnist_autoencoder.py)."""
  import importlib.util

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "autoencoder_eval.py")
  spec = importlib.util.spec_from_file_location("autoencoder_eval", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  _, ae_dir = runs["ae"]
  out = mod.run(ae_dir, lpips_weights=os.path.join(ae_dir, "lpips.npz"), num_test=12, batch_size=8)
  assert out["num_test"] == 12 and 0 < out["l1"] < 2 and np.isfinite(out["psnr_db"]) and out["lpips"] > 0
  assert out["objective"]["disc_weight"] == 0.5 and out["objective"]["perceptual_weight"] == 1.0
  with pytest.raises(SystemExit, match="holds a DiT, not an autoencoder"):
    mod.run(runs["latent"][1], num_test=8)


def test_latent_model_trains_and_samples_in_the_latents(runs, tmp_path):
  lat, lat_dir = runs["latent"]
  _, ae_dir = runs["ae"]
  assert all(np.isfinite(r["loss"]) for r in _rows(lat_dir))
  assert os.path.getsize(os.path.join(lat_dir, "samples_000004.png")) > 0
  config = generate.load_config(lat_dir)
  exp = train.build_experiment(config)
  stats = latent.read_stats(ae_dir)
  assert exp.shape == (14, 14, 4) and exp.latent.image_shape == (28, 28, 1)  # 2 levels: 2x down
  assert exp.latent.autoencoder.scaling_factor == pytest.approx(stats["scaling_factor"])
  mesh = sharding.create_mesh(config.mesh.to_dict())
  _, params = evaluate.restore_ema_params(config, lat_dir, exp, mesh)
  assert params["patch_embed_kernel"].shape == (1, 1, 4, 16)  # the DiT takes the 4 latent channels
  out = generate.generate(config, lat_dir, num_samples=8, labels=[3], out_dir=str(tmp_path))
  images = np.load(out["paths"]["npz"])["images"]
  assert images.shape == (8, 28, 28, 1) and images.dtype == np.uint8  # decoded to pixels
  # the decoder is the autoencoder run's, at its EMA parameters
  ae_config = generate.load_config(ae_dir)
  _, ae_params = evaluate.restore_ema_params(ae_config, ae_dir, train.build_experiment(ae_config), mesh)
  vae_params = latent.load_params(exp.latent, mesh)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ae_params), jax.tree.leaves(vae_params)))


def test_sdedit_edits_the_latents(runs, tmp_path, monkeypatch):
  """img2img: at a tiny strength the edit is the autoencoder's reconstruction of the input (the
  decoded posterior mean); at strength 1 it is a sample."""
  lat, lat_dir = runs["latent"]
  images = np.zeros((8, 28, 28, 1), np.uint8)
  images[:, 6:22, 12:16] = 255  # a "1"
  path = str(tmp_path / "ones.npz")
  np.savez(path, images=images)
  out = tasks.run_task(lat, lat_dir, task="sdedit", input_path=path, strength=0.01, method="ddim", num_steps=4,
                       out_dir=str(tmp_path))
  edited = np.load(out["paths"]["npz"])["output"].astype(np.int32)
  exp = train.build_experiment(lat)
  mesh = sharding.create_mesh(lat.mesh.to_dict())
  vae_params = latent.load_params(exp.latent, mesh)
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  mean_space = latent.LatentSpace(exp.latent.autoencoder, exp.latent.source, exp.latent.image_shape, False)
  recon = mean_space.decode(vae_params, mean_space.encode(vae_params, x))
  recon = np.clip(np.round((np.asarray(recon) + 1.0) * 127.5), 0, 255).astype(np.int32)
  assert out["nfe"] == 1 and edited.shape == (8, 28, 28, 1)
  full = tasks.run_task(lat, lat_dir, task="sdedit", input_path=path, strength=1.0, method="ddim", num_steps=4,
                        out_dir=str(tmp_path))
  sampled = np.load(full["paths"]["npz"])["output"].astype(np.int32)
  near, far = np.abs(edited - recon).mean(), np.abs(sampled - recon).mean()
  assert near < 8.0 and near < 0.1 * far  # measured: 2.6 against 88
  # towards classes, with classifier-free guidance (the class-conditional model's img2img)
  seen, score_fn = [], generate.model_score_fn

  def spy(exp, params, **kw):
    seen.append((kw["guidance_scale"], None if kw["labels"] is None else kw["labels"].shape))
    return score_fn(exp, params, **kw)

  monkeypatch.setattr(generate, "model_score_fn", spy)
  guided = tasks.run_task(lat, lat_dir, task="sdedit", input_path=path, strength=1.0, method="ddim", num_steps=4,
                          out_dir=str(tmp_path), labels=["3", "null"], guidance_scale=2.0)
  assert guided["labels"] == [3, 10] * 4 and guided["guidance_scale"] == 2.0
  assert guided["paths"]["npz"].endswith("_s1_cfg2.npz")
  saved = np.load(guided["paths"]["npz"])
  assert saved["labels"].tolist() == guided["labels"] and seen == [(2.0, (8,))]  # the labels reach the model
  with pytest.raises(InputError, match=r"--guidance_scale=2 guides towards --labels, which were not given"):
    tasks.run_task(lat, lat_dir, task="sdedit", input_path=path, guidance_scale=2.0)


def test_inpainting_runs_in_the_latents(runs, tmp_path):
  """Blended latent diffusion: the latent cells whose pixels are all known are the encoded
  image's (its hole filled with the known pixels' mean); the rest are generated; the output is
  their decoding with the known pixels pasted back exactly."""
  lat, lat_dir = runs["latent"]
  exp = train.build_experiment(lat)
  mesh = sharding.create_mesh(lat.mesh.to_dict())
  _, params = evaluate.restore_ema_params(lat, lat_dir, exp, mesh)
  vae_params = latent.load_params(exp.latent, mesh)
  x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1), minval=-1.0, maxval=1.0)
  mask = np.ones((1, 28, 28, 1), np.float32)
  mask[:, :, 13:] = 0.0  # columns 13.. unknown: latent columns 6.. (2x2 blocks; 6 codes pixels 12-13)
  score_fn = generate.model_score_fn(exp, params)
  out, info = jax.jit(lambda key: tasks.inpaint_images(key, exp, score_fn, x, mask, vae_params=vae_params,
                                                       method="ddim", num_steps=3))(jax.random.key(1))
  z, known = info["latents"], exp.latent.encode(vae_params, tasks.fill_unknown(x, mask))
  assert z.shape == (4, 14, 14, 4) and info["nfe"] == 3
  np.testing.assert_array_equal(np.asarray(out[:, :, :13]), np.asarray(x[:, :, :13]))
  np.testing.assert_allclose(z[:, :, :6], known[:, :, :6], atol=1e-6)
  assert float(jnp.abs(z[:, :, 6:] - known[:, :, 6:]).mean()) > 0.1  # generated
  np.testing.assert_allclose(out[:, :, 13:], exp.latent.decode(vae_params, z)[:, :, 13:], atol=1e-5)
  # from the command line (run_task's latent path, with Tweedie conditioning): the input centred, kept
  images = np.asarray((x + 1.0) * 127.5).round().astype(np.uint8)
  np.savez(str(tmp_path / "small.npz"), images=images[:, 4:24, 4:24])
  res = tasks.run_task(lat, lat_dir, task="outpaint", input_path=str(tmp_path / "small.npz"), method="ddim",
                       num_steps=2, out_dir=str(tmp_path), conditioning="tweedie", cg_steps=1)
  grown = np.load(res["paths"]["npz"])["output"]
  assert grown.shape == (4, 28, 28, 1) and res["nfe"] == 2
  np.testing.assert_array_equal(grown[:, 4:24, 4:24], images[:, 4:24, 4:24])


def test_what_cannot_run_says_so(runs, tmp_path):
  ae, ae_dir = runs["ae"]
  lat, lat_dir = runs["latent"]
  with pytest.raises(InputError, match="holds an autoencoder, which does not draw samples"):
    generate.generate(ae, ae_dir, num_samples=2)
  with pytest.raises(InputError, match="latent diffusion model: its bits/dim would be of the latents"):
    evaluate.evaluate_likelihood(lat, lat_dir, num_examples=8)
  with pytest.raises(InputError, match=r"--task=sdedit \(img2img\), inpaint and outpaint run in latent space"):
    tasks.run_task(lat, lat_dir, task="colorize", input_path="unused.npz")

  def check(match, **changes):
    c = load_config("mnist_latent", "tiny")
    c.latent.autoencoder = f"jaxdiff:{ae_dir}"
    for key, value in changes.items():
      section, name = key.split("__")
      c[section][name] = value
    with pytest.raises(ConfigError, match=match):
      configs.validate(c)

  check(r"config.latent.autoencoder='vae:x' is not '<source>:<path>'", latent__autoencoder="vae:x")
  check(r"config.json does not exist", latent__autoencoder=f"jaxdiff:{tmp_path}")
  check(r"is a run of config.model.name='dit', not an autoencoder", latent__autoencoder=f"jaxdiff:{lat_dir}")
  check(r"set --config.data.centered=True", data__centered=False)
  check(r"super-resolution in latent space is not supported", data__cond_resolution=14, model__num_classes=0,
        data__use_labels=False)
  check(r"the latent side 14 \(config.latent\)=14 is not a multiple of config.model.patch_size=3",
        model__patch_size=3)
  check(r"config.latent.scaling_factor=-1.0 must be > 0", latent__scaling_factor=-1.0)
  pytest.importorskip("safetensors")
  check(r"codes images of 3 channel\(s\) \(out: 3\), but config.data.num_channels=1",
        latent__autoencoder=f"diffusers:{FIXTURE}")
  no_stats = tmp_path / "ae_without_stats"
  no_stats.mkdir()
  shutil.copy(os.path.join(ae_dir, "config.json"), no_stats)
  check(r"has no latent_stats.json", latent__autoencoder=f"jaxdiff:{no_stats}")

  def check_ae(match, **changes):
    c = load_config("mnist_autoencoder", "tiny")
    for key, value in changes.items():
      section, name = key.split("__")
      c[section][name] = value
    with pytest.raises(ConfigError, match=match):
      configs.validate(c)

  check_ae(r"config.model.in_channels=3 but config.data.num_channels=1", model__in_channels=3)
  check_ae(r"config.data.resolution=28 is not a multiple of the autoencoder's downsampling factor 8",
           model__block_out_channels=(8, 8, 8, 8))
  check_ae(r"set --config.data.use_labels=False", data__use_labels=True)


def test_reflow_of_a_latent_model_on_fixed_pairs(runs, tmp_path):
  """Reflow of the latent DiT on fixed pairs: the pairs are latents (the teacher's space), the loop
  does not encode them again, and the student's samples are decoded to pixels."""
  lat, lat_dir = runs["latent"]
  config = lat.copy_and_resolve_references()
  config.distill.update(teacher=lat_dir, method="reflow", solver="ddim", teacher_steps=2,
                        pairs=str(tmp_path / "pairs"), num_pairs=8, pairs_dtype="float16")
  config.training.update(num_steps=2, steps_per_call=1, log_every=1, checkpoint_every=2, num_final_samples=8)
  out = train.train_and_evaluate(config, str(tmp_path / "student"))
  assert np.isfinite(out["loss"])
  x = np.load(tmp_path / "pairs" / "x.npy")
  assert x.shape == (8, 14, 14, 4) and x.dtype == np.float16  # latents, stored in half the space
  assert json.loads((tmp_path / "pairs" / "pairs.json").read_text())["dtype"] == "float16"
  assert os.path.getsize(tmp_path / "student" / "samples_000002.png") > 0

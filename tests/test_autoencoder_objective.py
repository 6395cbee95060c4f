"""Latent diffusion's autoencoder objective beyond L1 + KL: the LPIPS perceptual term, the patch
discriminator, the hinge loss and the adaptive weight, and the adversarial train step's
gradients against an independent computation. (`tests/test_latent.py` trains an autoencoder
with all of them through run_train's loop.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import losses, train
from jaxdiff.errors import ConfigError, InputError
from jaxdiff.models import lpips
from jaxdiff.models.autoencoder import AutoencoderKL, kl_divergence
from jaxdiff.models.discriminator import PatchDiscriminator, patch_grid

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, mid_attention=False)


def test_patch_discriminator_is_pix2pix_s():
  """LDM's discriminator (64 wide, 3 layers, RGB) has the parameters of pix2pix's NLayerDiscriminator
  built in torch (2,765,633: BatchNorm's affine = GroupNorm's) and its 30x30 logits at 256x256."""
  shapes = jax.eval_shape(PatchDiscriminator().init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
  assert sum(a.size for a in jax.tree.leaves(shapes)) == 2_765_633
  out = jax.eval_shape(PatchDiscriminator().apply, shapes, jnp.zeros((2, 256, 256, 3)))
  assert out.shape == (2, 30, 30, 1) and patch_grid(256, 3) == 30
  small = PatchDiscriminator(features=8, num_layers=2)
  params = small.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  assert sum(a.size for a in jax.tree.leaves(params)) == 10_985  # torch: 10,985
  assert small.apply(params, jnp.ones((2, 28, 28, 1))).shape == (2, patch_grid(28, 2), 5, 1)
  with pytest.raises(InputError, match=r"x.shape=\(1, 16, 16, 1\) must be \[B, H, W, C\] with H, W >= 24 for "
                                       r"num_layers=3; use fewer layers"):
    PatchDiscriminator(features=8).init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  with pytest.raises(ConfigError, match=r"features=40: the normalised widths \(80, 160\) must be multiples of 32"):
    PatchDiscriminator(features=40, num_layers=2).check()


def test_hinge_loss_and_adaptive_weight_closed_forms():
  real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.0])
  # (mean(relu(1 - [2, .5])) + mean(relu(1 + [-2, 0]))) / 2 = (0.25 + 0.5) / 2
  np.testing.assert_allclose(float(losses.hinge_discriminator_loss(real, fake)), 0.375, rtol=1e-7)
  a, b = jnp.array([3.0, 0.0]), jnp.array([0.0, 4.0])
  np.testing.assert_allclose(float(losses.adaptive_adversarial_weight(a, b)), 3.0 / (4.0 + 1e-4), rtol=1e-6)
  assert float(losses.adaptive_adversarial_weight(a, 0.0 * b)) == 1e4  # clipped
  assert float(losses.adaptive_adversarial_weight(a, 0.0 * b, max_weight=7.0)) == 7.0
  grad = jax.grad(lambda v: losses.adaptive_adversarial_weight(v, b))(a)  # a weight, not a term to descend
  assert float(jnp.abs(grad).max()) == 0.0


def test_perceptual_term_is_lpips_of_the_reconstruction():
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1), minval=-1, maxval=1)
  recon = jnp.clip(x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), -1, 1)
  mean, logvar = jnp.ones((2, 4, 4, 2)), jnp.zeros((2, 4, 4, 2))
  params = _numpy_init(lpips.abstract_params(), 2)
  params = jax.tree_util.tree_map_with_path(  # LPIPS' linear layers are >= 0
      lambda path, v: jnp.abs(v) if "lin" in jax.tree_util.keystr(path) else v, params)
  objective = losses.make_autoencoder_objective(kl_weight=0.5, perceptual_weight=0.25, data_range=(-1.0, 1.0))
  loss, aux = jax.jit(objective)(x, recon, mean, logvar, params)
  want_p = jax.jit(lambda p, a, b: lpips.lpips_distance(p, a, b, resolution=None))(params, recon, x)
  assert float(jnp.min(want_p)) > 0
  np.testing.assert_allclose(float(aux["perceptual"]), float(jnp.mean(want_p)), rtol=1e-6)
  want = jnp.mean(jnp.abs(recon - x)) + 0.25 * jnp.mean(want_p) + 0.5 * jnp.mean(kl_divergence(mean, logvar)) / 256
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
  with pytest.raises(ConfigError, match=r"config.loss.perceptual_weight=0.25 needs the LPIPS weights as the loss's"):
    objective(x, recon, mean, logvar)
  with pytest.raises(ConfigError, match=r"config.loss.perceptual_weight=-1.0 must be >= 0"):
    losses.make_autoencoder_objective(perceptual_weight=-1.0)
  plain, _ = losses.make_autoencoder_objective(kl_weight=0.5)(x, recon, mean, logvar)
  np.testing.assert_allclose(float(plain), float(want - 0.25 * jnp.mean(want_p)), rtol=1e-6)


def _numpy_init(shapes, seed: int):
  """Parameters of these shapes drawn on the host (N(0, 1 / fan-in); compiling `init` costs seconds)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]) or 1),
                                            jnp.float32), shapes)


def _setup(disc_start: int, adversarial: bool | None = None):
  model, disc = AutoencoderKL(**TINY), PatchDiscriminator(features=4, num_layers=1, num_groups=4)
  x = jax.random.uniform(jax.random.key(3), (4, 8, 8, 3), minval=-1, maxval=1)
  optimizer = optax.sgd(1.0)  # new = old - grad: the update is the gradient
  params = _numpy_init(jax.eval_shape(model.init, jax.random.key(0), x[:1])["params"], 0)
  d_params = _numpy_init(jax.eval_shape(disc.init, jax.random.key(0), x[:1])["params"], 1)
  state = train.AdversarialState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                                 opt_state=optimizer.init(params), disc_params=d_params,
                                 disc_opt_state=optimizer.init(d_params))
  objective = losses.make_autoencoder_objective(kl_weight=1e-3)
  step = jax.jit(lambda s, b, k: train.adversarial_autoencoder_train_step(
      s, b, k, model=model, discriminator=disc, objective=objective, optimizer=optimizer, ema_decay=0.9,
      disc_weight=0.5, disc_start=disc_start, adversarial=adversarial))
  return model, disc, x, optimizer, state, objective, step


@pytest.mark.parametrize("disc_start, adversarial", [(0, None), (5, True)])
def test_adversarial_step_matches_an_independent_computation(disc_start, adversarial):
  """From `disc_start` on (or whatever the step with adversarial=True, the training loop's
  program after disc_start), the autoencoder's gradient is grad L_rec + w grad L_adv with w = 0.5
  ||grad_last L_rec|| / (||grad_last L_adv|| + 1e-4) (each gradient taken on its own here), and
  the discriminator's is the hinge loss's on the batch and the (fixed) reconstructions."""
  model, disc, x, _, state, objective, step = _setup(disc_start, adversarial)
  key = jax.random.key(7)
  new, m = step(state, {"x": x}, key)

  rec_loss = lambda p: objective(x, *model.apply({"params": p}, x, key))[0]  # noqa: E731
  adv_loss = lambda p: -jnp.mean(disc.apply({"params": state.disc_params},  # noqa: E731
                                            model.apply({"params": p}, x, key)[0]))

  def hinge(dp, recon):
    logits = disc.apply({"params": dp}, jnp.concatenate([x, recon]))
    return losses.hinge_discriminator_loss(logits[:4], logits[4:])

  @jax.jit
  def reference(p, dp):
    recon = model.apply({"params": p}, x, key)[0]
    return jax.value_and_grad(rec_loss)(p), jax.value_and_grad(adv_loss)(p), jax.value_and_grad(hinge)(dp, recon)

  (l_rec, g_rec), (l_adv, g_adv), (l_d, g_d) = reference(state.params, state.disc_params)
  last = lambda t: t["decoder"]["conv_out"]["kernel"]  # noqa: E731
  w = 0.5 * float(jnp.linalg.norm(last(g_rec))) / (float(jnp.linalg.norm(last(g_adv))) + 1e-4)
  assert 0 < w < 1e4
  np.testing.assert_allclose(float(m["adversarial_weight"]), w, rtol=1e-4)
  np.testing.assert_allclose(float(m["loss"]), float(l_rec + w * l_adv), rtol=1e-5)
  np.testing.assert_allclose(float(m["discriminator_loss"]), float(l_d), rtol=1e-5)
  got = jax.tree.map(lambda a, b: a - b, (state.params, state.disc_params), (new.params, new.disc_params))
  want = (jax.tree.map(lambda a, b: a + w * b, g_rec, g_adv), g_d)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4 * float(jnp.abs(e).max()))
  assert int(new.step) == 1 and float(m["disc_grad_norm"]) > 0


@pytest.mark.parametrize("adversarial", [None, False])
def test_before_disc_start_the_step_is_the_plain_one(adversarial):
  """Before `disc_start` the autoencoder takes the plain (reconstruction + KL) update and the
  discriminator and its optimizer stand still: in the program that selects by step (None) and in
  the training loop's warm-up program (False)."""
  model, _, x, optimizer, state, objective, step = _setup(1, adversarial)
  key = jax.random.key(7)
  new, m = step(state, {"x": x}, key)
  plain_state = train.TrainState(step=state.step, params=state.params, ema_params=state.ema_params,
                                 opt_state=state.opt_state)
  plain, pm = jax.jit(lambda s, b, k: train.autoencoder_train_step(
      s, b, k, model=model, loss_fn=lambda ae, x, k, _: objective(x, *ae(x, k)), optimizer=optimizer,
      ema_decay=0.9))(plain_state, {"x": x}, key)
  assert float(m["adversarial_weight"]) == 0.0 and float(m["loss"]) == pytest.approx(float(pm["loss"]), rel=1e-6)
  for a, b in zip(jax.tree.leaves((new.params, new.ema_params)), jax.tree.leaves((plain.params, plain.ema_params))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(new.disc_params), jax.tree.leaves(state.disc_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(new.disc_opt_state), jax.tree.leaves(state.disc_opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(m["discriminator_loss"]) == 0.0 and float(m["disc_grad_norm"]) == 0.0
  with pytest.raises(ConfigError, match="needs an AdversarialState"):
    step(plain_state, {"x": x}, key)


def test_warmup_program_never_evaluates_the_discriminator():
  """adversarial=False (the loop's program before disc_start) costs what the plain step costs,
  not what the step that computes both phases and selects one does."""
  flops, compiled = {}, {}
  for adversarial in (None, False):
    _, _, x, _, state, _, step = _setup(1, adversarial)
    compiled[adversarial] = step.lower(state, {"x": x}, jax.random.key(0)).compile()
    flops[adversarial] = compiled[adversarial].cost_analysis()["flops"]
  assert flops[None] - flops[False] > 0.2 * flops[None], flops  # the discriminator's forward and backward
  # a NaN discriminator does not reach the warm-up update (it would through 0 * grad in the other)
  nan_disc = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), state.disc_params)
  new, m = compiled[False](state.replace(disc_params=nan_disc), {"x": x}, jax.random.key(0))
  assert all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves((new.params, m)))


def test_config_errors_name_the_key():
  from conftest import load_config
  from jaxdiff import configs as config_lib

  def check(match, name="mnist_autoencoder", **loss):
    c = load_config(name, "tiny") if name != "tiny" else load_config(name)
    c.loss.update(**loss)
    with pytest.raises(ConfigError, match=match):
      config_lib.validate(c)

  gan = load_config("mnist_autoencoder")
  gan.loss.update(disc_weight=0.5, disc_start=600, disc_layers=2)  # README's MNIST measurement
  config_lib.validate(gan)
  disc = train.make_discriminator(gan)
  assert (disc.features, disc.num_layers) == (64, 2) and train.make_discriminator(load_config("tiny")) is None
  assert "adversarial (0.5, adaptive; from update 600)" in train._autoencoder_terms(gan)
  check(r"config.loss.disc_layers=4 halves 28x28 images too often .* use --config.loss.disc_layers=3",
        disc_weight=0.5, disc_layers=4)
  check(r"config.loss.disc_start=-1 must be >= 0", disc_weight=0.5, disc_start=-1)
  check(r"config.loss.perceptual_weight=1.0 needs the LPIPS weights: .* or set --config.loss.perceptual_weight=0",
        perceptual_weight=1.0)
  check(r"config.loss.disc_weight=0.5 is a term of the autoencoder's loss, but config.model.name='unet'",
        name="tiny", disc_weight=0.5)

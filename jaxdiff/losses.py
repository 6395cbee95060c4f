"""Denoising training objectives for any process and parameterization.

`make_denoising_loss(process, prediction=..., ...)` returns a pure function

    loss_fn(net, x0, key) -> (loss [], aux)

where `net(x, c) -> out` is the network with its parameters (and conditioning, dropout
key) bound. One function covers the objectives of the field:

| target / weighting        | what it is                                                       |
|---------------------------|------------------------------------------------------------------|
| `eps`, `none`             | Ho et al.'s L_simple (eps-MSE); = DSM with sigma^2 weighting     |
| `v` / `x0`, `none`        | v- or x0-MSE                                                     |
| `flow`, `none`            | flow matching: (eps - x0)-MSE (Lipman et al.); + `logit_normal` t: SD3 |
| any, `likelihood`         | score matching weighted by g(t)^2 (Song et al. 2021, an ELBO bound) |
| `x0`, `edm` + lognormal t | Karras et al.: lambda(sigma) = (sigma^2+sigma_d^2)/(sigma sigma_d)^2 |
| any, `min_snr`            | min-SNR-gamma weighting (Hang et al. 2023), in eps space         |
| `ncsn` (VE + discrete)    | Song & Ermon's SMLD loss over `num_scales` geometric sigmas       |

The per-example loss is reduced over data dimensions by `reduce` ('mean' or 'sum') and then
averaged over the batch.

`make_classifier_loss(process)` is the cross-entropy objective of a noise-conditional
classifier for classifier guidance: `loss_fn(net, x0, labels, key) -> (loss, aux)`.

`make_autoencoder_loss(kl_weight=...)` is the KL-regularised autoencoder's objective (the
VAE of latent diffusion): `loss_fn(autoencoder, x, key) -> (loss, aux)`, with LPIPS as an
optional perceptual term; `hinge_discriminator_loss` and `adaptive_adversarial_weight` are the
adversarial term's pieces (`train.adversarial_autoencoder_train_step`).

`make_distillation_loss(process, prediction=...)` is progressive distillation's objective
(Salimans & Ho 2022): `loss_fn(net, teacher, x0, key, num_steps) -> (loss, aux)` trains a
student to take in one DDIM step what the teacher takes in two.

`make_consistency_loss(process, prediction=...)` is consistency distillation's (Song et al.
2023): `loss_fn(net, target, teacher, x0, key) -> (loss, aux)` trains a consistency model,
which jumps from any point of the teacher's probability-flow trajectory to its start.

`make_consistency_training_loss(process, prediction=...)` is consistency training's (Song et
al. 2023; Song & Dhariwal 2024): `loss_fn(net, target, x0, key, step) -> (loss, aux)` learns a
consistency model from data alone, no teacher.

`make_reflow_loss(process, prediction=...)` is reflow's (Liu et al. 2023): `loss_fn(net,
teacher, x0, key) -> (loss, aux)` trains on noise coupled to the teacher's samples of it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import guidance
from jaxdiff import parameterization as param_lib
from jaxdiff.errors import ConfigError
from jaxdiff.processes import DDPM, EDM, VE, Process, bcast

Array = jax.Array

TARGETS = ("eps", "x0", "v", "score", "flow")
WEIGHTINGS = ("none", "likelihood", "edm", "min_snr")
T_SAMPLINGS = ("process", "lognormal", "discrete", "logit_normal")


def _check(name, value, valid):
  if value not in valid:
    raise ConfigError(f"config.loss.{name}={value!r} is not known; valid values are: {', '.join(valid)}.")


def make_denoising_loss(
    process: Process,
    *,
    prediction: str = "eps",
    target: str | None = None,
    weighting: str = "none",
    reduce: str = "mean",
    t_sampling: str = "process",
    p_mean: float = -1.2,
    p_std: float = 1.2,
    num_scales: int = 1000,
    min_snr_gamma: float = 5.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> Callable[..., tuple[Array, dict[str, Any]]]:
  """Builds `loss_fn(net, x0, key, eps=None) -> (loss, aux)` (`eps`: the noise paired with x0; None: drawn).

  Args:
    process: the diffusion process.
    prediction: what the network outputs ('eps', 'x0', 'v', 'score', 'flow' or 'edm').
    target: the space the squared error is measured in; defaults to `prediction`
      ('x0' for 'edm').
    weighting: 'none', 'likelihood' (g^2), 'edm' (Karras' lambda) or 'min_snr'.
    reduce: 'mean' or 'sum' of the squared error over data dimensions.
    t_sampling: 'process' (the process's own training times: uniform in t, or uniform
      steps for DDPM), 'lognormal' (EDM: log sigma ~ N(p_mean, p_std^2); alpha=1
      processes only), 'discrete' (NCSN: one of `num_scales` geometric sigmas; VE only) or
      'logit_normal' (Esser et al. 2024: t = t_min + (T - t_min) sigmoid(n),
      n ~ N(logit_mean, logit_std^2), more weight on the middle times; continuous processes).
  """
  param_lib.check_prediction(prediction)
  target = target or ("x0" if prediction == "edm" else prediction)
  _check("target", target, TARGETS)
  _check("weighting", weighting, WEIGHTINGS)
  _check("reduce", reduce, ("mean", "sum"))
  _check("t_sampling", t_sampling, T_SAMPLINGS)
  if t_sampling == "lognormal" and not isinstance(process, (EDM, VE)):
    raise ConfigError(f"config.loss.t_sampling='lognormal' draws sigma directly and needs the EDM "
                      f"process, not {type(process).__name__}; use t_sampling='process'.")
  if t_sampling == "discrete" and not isinstance(process, VE):
    raise ConfigError(f"config.loss.t_sampling='discrete' is NCSN's loss and needs the VE process, "
                      f"not {type(process).__name__}; use t_sampling='process'.")
  if t_sampling == "logit_normal":
    if isinstance(process, DDPM):
      raise ConfigError("config.loss.t_sampling='logit_normal' draws continuous times, but the DDPM process "
                        "has integer steps; use t_sampling='process' or a continuous process "
                        "(e.g. config.process.name='rectified_flow').")
    if not logit_std > 0:
      raise ConfigError(f"config.loss.logit_std={logit_std} must be > 0 (SD3 uses 1.0).")
  if weighting == "edm" and not isinstance(process, EDM):
    raise ConfigError(f"config.loss.weighting='edm' needs the EDM process (its sigma_data), "
                      f"not {type(process).__name__}.")

  def sample_t(key, batch):
    if t_sampling == "lognormal":
      log_sigma = p_mean + p_std * jax.random.normal(key, (batch,))
      sigma = jnp.exp(log_sigma)
      if isinstance(process, EDM):
        return sigma
      return process.t_from_log_snr(-2.0 * log_sigma)
    if t_sampling == "discrete":
      idx = jax.random.randint(key, (batch,), 0, num_scales)
      return process.t_from_log_snr(-2.0 * jnp.log(process.discrete_sigmas(num_scales)[idx]))
    if t_sampling == "logit_normal":
      u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch,)))
      return process.t_min + (process.T - process.t_min) * u
    return process.sample_t(key, batch)

  def loss_fn(net, x0: Array, key: Array, eps: Array | None = None) -> tuple[Array, dict[str, Any]]:
    k_t, k_eps = jax.random.split(key)
    batch = x0.shape[0]
    t = sample_t(k_t, batch)
    if eps is None:  # given: a coupling of data and noise (reflow); drawn: the independent one
      eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    x_t = process.marginal(x0, t, eps)
    alpha, sigma = process.alpha(t), process.sigma(t)
    a, s = bcast(alpha, x0), bcast(sigma, x0)

    x0_hat, eps_hat, out = param_lib.predict(net, process, prediction, x_t, t)
    if weighting == "likelihood":
      # g^2 * ||s_hat - s||^2 = g^2 / sigma^2 * ||eps_hat - eps||^2, whatever the target.
      _, g2 = process.f_g2(t)
      err, w = eps_hat - eps, g2 / sigma**2
    elif weighting == "min_snr":
      snr = (alpha / sigma) ** 2
      err, w = eps_hat - eps, jnp.minimum(snr, min_snr_gamma) / snr
    else:
      if target == prediction and prediction != "edm":
        pred = out.astype(x0.dtype)
      else:
        pred = param_lib.from_x0_eps(x0_hat, eps_hat, a, s, target)
      err = pred - param_lib.from_x0_eps(x0, eps, a, s, target)
      if weighting == "edm":
        sd = process.sigma_data
        w = (sigma**2 + sd**2) / (sigma * sd) ** 2
      else:
        w = jnp.ones_like(t)
    sq = jnp.square(err.astype(jnp.float32)).reshape(batch, -1)
    per_example = jnp.mean(sq, axis=-1) if reduce == "mean" else jnp.sum(sq, axis=-1)
    per_example = w * per_example
    loss = jnp.mean(per_example)
    return loss, {"loss_per_example": per_example, "t": t}

  return loss_fn



CLASSIFIER_T_SAMPLINGS = ("process", "clean")


def make_classifier_loss(process: Process, *,
                         t_sampling: str = "process") -> Callable[..., tuple[Array, dict[str, Any]]]:
  """Builds `loss_fn(net, x0, labels, key) -> (loss, aux)` for a noise-conditional classifier.

  The cross-entropy of `net(x_in, c) -> logits [B, K]` on `x_t = alpha x0 + sigma eps` at
  random times, `x_in, c = guidance.classifier_input(process, x_t, t)` (what guidance feeds
  it), as Dhariwal & Nichol train their ImageNet classifiers. `aux` holds the batch
  `accuracy` and the times `t`.

  Args:
    process: the diffusion process whose noised data the classifier will guide.
    t_sampling: 'process' (the process's training times, the noise-conditional classifier
      classifier guidance needs) or 'clean' (every example at t_min: a classifier of clean
      data, e.g. to evaluate samples).
  """
  _check("t_sampling", t_sampling, CLASSIFIER_T_SAMPLINGS)

  def loss_fn(net, x0: Array, labels: Array, key: Array) -> tuple[Array, dict[str, Any]]:
    k_t, k_eps = jax.random.split(key)
    batch = x0.shape[0]
    if t_sampling == "clean":
      t = jnp.full((batch,), process.t_min, jnp.float32)
    else:
      t = process.sample_t(k_t, batch)
    x_t = process.marginal(x0, t, jax.random.normal(k_eps, x0.shape, x0.dtype))
    logits = net(*guidance.classifier_input(process, x_t, t)).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    return jnp.mean(nll), {"accuracy": accuracy, "t": t, "loss_per_example": nll}

  return loss_fn


RECONSTRUCTIONS = ("l1", "l2")


def make_autoencoder_objective(*, kl_weight: float = 1e-6, reconstruction: str = "l1", perceptual_weight: float = 0.0,
                               lpips_resolution: int = 0, data_range: tuple[float, float] | None = None
                               ) -> Callable[..., tuple[Array, dict[str, Any]]]:
  """Builds `objective(x, recon, mean, logvar, metric_params=None) -> (loss, aux)`: a KL
  autoencoder's loss given its reconstruction `recon` of `x` and its posterior N(mean, exp(logvar)).

    mean over pixels of |x - recon| (l1) or (x - recon)^2 (l2)
      + perceptual_weight * LPIPS(x, recon)
      + kl_weight * KL(q(z|x) || N(0, I)) / (pixels per example),

  averaged over the batch: Rombach et al.'s objective without its adversarial term (which
  `train.adversarial_autoencoder_train_step` adds) and without their learned output
  log-variance (one scalar, 0 at the start), divided by the number of pixels, so
  `kl_weight` and `perceptual_weight` mean what they do there (their KL-f8 autoencoders: 1e-6
  and 1.0). LPIPS (`metric_params`: its weights, `models.lpips.load_lpips`) compares the images
  mapped from `data_range` to [-1, 1] at `lpips_resolution` (0: their own size). `aux` holds the
  batch means of the reconstruction error, the KL per example and, with a perceptual term, LPIPS
  (`reconstruction`, `kl`, `perceptual`).
  """
  _check("reconstruction", reconstruction, RECONSTRUCTIONS)
  if not kl_weight >= 0.0:
    raise ConfigError(f"config.loss.kl_weight={kl_weight} must be >= 0 (LDM's KL-f8 autoencoders: 1e-6).")
  if not perceptual_weight >= 0.0:
    raise ConfigError(f"config.loss.perceptual_weight={perceptual_weight} must be >= 0 (LDM's autoencoders: 1.0; "
                      f"0: no perceptual term).")
  from jaxdiff.models.autoencoder import kl_divergence
  lpips = (_consistency_metric("lpips", "mean", lpips_resolution, data_range,
                               f"config.loss.perceptual_weight={perceptual_weight}")
           if perceptual_weight else None)

  def objective(x: Array, recon: Array, mean: Array, logvar: Array,
                metric_params: Any = None) -> tuple[Array, dict[str, Any]]:
    err = recon.astype(jnp.float32) - x
    rec = jnp.mean(jnp.abs(err) if reconstruction == "l1" else jnp.square(err))
    kl = jnp.mean(kl_divergence(mean, logvar))
    pixels = x.size // x.shape[0]
    loss, aux = rec + kl_weight * kl / pixels, {"reconstruction": rec, "kl": kl}
    if lpips is not None:
      aux["perceptual"] = jnp.mean(lpips(recon, x, metric_params))
      loss = loss + perceptual_weight * aux["perceptual"]
    return loss, aux

  return objective


def make_autoencoder_loss(**objective_kw) -> Callable[..., tuple[Array, dict[str, Any]]]:
  """Builds `loss_fn(autoencoder, x, key, metric_params=None) -> (loss, aux)` for a KL autoencoder:
  `make_autoencoder_objective(**objective_kw)` of `autoencoder(x, key) -> (recon, mean, logvar)`,
  which decodes a sample of q(z|x) (`models.AutoencoderKL` with its parameters bound)."""
  objective = make_autoencoder_objective(**objective_kw)

  def loss_fn(autoencoder, x: Array, key: Array, metric_params: Any = None) -> tuple[Array, dict[str, Any]]:
    return objective(x, *autoencoder(x, key), metric_params)

  return loss_fn


def hinge_discriminator_loss(real_logits: Array, fake_logits: Array) -> Array:
  """A discriminator's hinge loss (Lim & Ye 2017; LDM's autoencoders): (mean relu(1 - D(x)) +
  mean relu(1 + D(x_hat))) / 2 over all logits (patches) of the batch."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits)))


def adaptive_adversarial_weight(nll_grad: Array, adversarial_grad: Array, *, max_weight: float = 1e4) -> Array:
  """Esser et al.'s (2021) balance of the generator's adversarial term: ||grad of the
  reconstruction loss|| / (||grad of the adversarial loss|| + 1e-4), both with respect to the
  decoder's last layer, clipped to [0, max_weight] and not differentiated."""
  ratio = jnp.linalg.norm(nll_grad.astype(jnp.float32)) / (jnp.linalg.norm(adversarial_grad.astype(jnp.float32))
                                                            + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight))


DISTILL_WEIGHTINGS = ("truncated_snr", "snr_plus_one")


def ddim_x0_step(process: Process, z: Array, x0: Array, t: Array, s: Array) -> Array:
  """A deterministic DDIM step from time t to s given the denoised estimate `x0`:
  `z_s = alpha_s x0 + sigma_s (z_t - alpha_t x0) / sigma_t` (the sampler's `ddim` with eta=0)."""
  a_t, s_t = bcast(process.alpha(t), z), bcast(process.sigma(t), z)
  a_s, s_s = bcast(process.alpha(s), z), bcast(process.sigma(s), z)
  return a_s * x0 + s_s * (z - a_t * x0) / s_t


def _teacher_denoiser(process: Process, prediction: str, clip: tuple[float, float] | None):
  """`fn(teacher, z, t) -> x0_hat`: a teacher network's denoised estimate, clipped to `clip` as its
  sampler did (None: not clipped)."""
  def teacher_x0(teacher, z, t):
    x0, _, _ = param_lib.predict(teacher, process, prediction, z, t)
    return x0 if clip is None else jnp.clip(x0, *clip)
  return teacher_x0


def distillation_target(process: Process, z_t: Array, z_s: Array, t: Array, s: Array) -> Array:
  """The x0 whose single DDIM step from `(z_t, t)` lands on `z_s` at time `s < t`.

  Solving `z_s = alpha_s x + (sigma_s / sigma_t)(z_t - alpha_t x)` for x:
  `x = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)`. The
  denominator is `sigma_s (SNR_s^(1/2) - SNR_t^(1/2)) > 0` because the SNR falls with t.
  """
  ratio = bcast(process.sigma(s) / process.sigma(t), z_t)
  a_t, a_s = bcast(process.alpha(t), z_t), bcast(process.alpha(s), z_t)
  return (z_s - ratio * z_t) / (a_s - ratio * a_t)


def make_distillation_loss(
    process: Process,
    *,
    prediction: str = "eps",
    weighting: str = "truncated_snr",
    reduce: str = "mean",
    clip: tuple[float, float] | None = None,
) -> Callable[..., tuple[Array, dict[str, Any]]]:
  """Builds progressive distillation's `loss_fn(net, teacher, x0, key, num_steps) -> (loss, aux)`.

  Salimans & Ho (2022), Algorithm 2. The student takes `num_steps` (N, may be traced) DDIM
  steps on the process's default grid of N + 1 times (`process.default_grid_at(j / N)`: uniform
  in t, DDPM's integer steps, EDM's Karras grid; what `samplers.sample(method='ddim',
  num_steps=N + 1, denoise=False)` evaluates); the teacher takes twice as many on the grid of
  2N + 1, every student interval halved. For each example a student interval
  t -> t'' is drawn uniformly, `z_t = alpha_t x0 + sigma_t eps`, the teacher takes its two
  deterministic DDIM steps t -> t' -> t'' (no gradient), and the student's denoised estimate
  at z_t is regressed on `distillation_target`, the x0 whose one DDIM step lands where the
  teacher's two did:

    loss = w(t) ||x0_student(z_t) - x0_target||^2,
    w = max(SNR, 1) ('truncated_snr') or SNR + 1 ('snr_plus_one'; v-MSE on VP processes),

  where SNR = alpha^2 / sigma^2 at t. Both keep the weight finite where SNR -> 0 (x0-MSE
  would vanish there and eps-MSE explode). Student and teacher have the same
  parameterization (`prediction`); 'v', 'x0' or 'flow' keep the student's x0 finite at
  t = T, where alpha is near 0 ('eps' divides by alpha there).

  Args:
    process: the diffusion process of both models (its grids must nest, which
      `jaxdiff.distill.check_process` checks).
    prediction: what both networks output.
    weighting: 'truncated_snr' or 'snr_plus_one'.
    reduce: 'mean' or 'sum' of the squared error over data dimensions.
    clip: `(lo, hi)` clips the teacher's x0 to the data range, as its sampler does with
      `clip_denoised` (None: no clipping; latents and vector data).

  `net` and `teacher` are `net(x, c) -> out` with parameters (and conditioning) bound. `aux`
  holds `loss_per_example`, the times `t` and the SNR weights `w`.
  """
  param_lib.check_prediction(prediction)
  if weighting not in DISTILL_WEIGHTINGS:
    raise ConfigError(f"config.distill.weighting={weighting!r} is not known; valid values are: "
                      f"{', '.join(DISTILL_WEIGHTINGS)}.")
  _check("reduce", reduce, ("mean", "sum"))

  teacher_x0 = _teacher_denoiser(process, prediction, clip)

  def loss_fn(net, teacher, x0: Array, key: Array, num_steps) -> tuple[Array, dict[str, Any]]:
    k_j, k_eps = jax.random.split(key)
    batch = x0.shape[0]
    n = jnp.asarray(num_steps, jnp.int32)
    j = jax.random.randint(k_j, (batch,), 0, n).astype(jnp.float32)  # the student's interval
    # the student's grid: the `ddim` sampler's `process.default_grid(N + 1)`, at fractions j / N;
    # the teacher's, of 2N + 1 points, adds those at (j + 1/2) / N
    nf = n.astype(jnp.float32)
    t, t_mid, t_end = (process.default_grid_at((j + d) / nf) for d in (0.0, 0.5, 1.0))
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    z_t = process.marginal(x0, t, eps)
    z_mid = ddim_x0_step(process, z_t, teacher_x0(teacher, z_t, t), t, t_mid)
    z_end = ddim_x0_step(process, z_mid, teacher_x0(teacher, z_mid, t_mid), t_mid, t_end)
    target = jax.lax.stop_gradient(distillation_target(process, z_t, z_end, t, t_end))

    x0_hat, _, _ = param_lib.predict(net, process, prediction, z_t, t)
    snr = (process.alpha(t) / process.sigma(t)) ** 2
    w = jnp.maximum(snr, 1.0) if weighting == "truncated_snr" else snr + 1.0
    sq = jnp.square((x0_hat - target).astype(jnp.float32)).reshape(batch, -1)
    per_example = w * (jnp.mean(sq, axis=-1) if reduce == "mean" else jnp.sum(sq, axis=-1))
    return jnp.mean(per_example), {"loss_per_example": per_example, "t": t, "w": w}

  return loss_fn


CONSISTENCY_SOLVERS = ("heun", "ddim")
CONSISTENCY_METRICS = ("l2", "pseudo_huber", "lpips")


def teacher_ode_step(process: Process, x0_fn: Callable[[Array, Array], Array], z: Array, t: Array, s: Array,
                     solver: str = "heun") -> Array:
  """One step of the probability-flow ODE from `(z, t)` to time `s`, given the denoiser `x0_fn(z, t)`.

  In `y = z / alpha` with noise level `n = sigma / alpha` every Gaussian process is
  `dy/dn = (y - x0_hat) / n` (Karras et al. 2022). 'ddim' is its Euler step (exactly
  `ddim_x0_step`, one evaluation); 'heun' adds Heun's correction at `s` (two evaluations, as
  the `heun` sampler and Song et al.'s consistency distillation take). `t`, `s`: `[B]`."""
  x0_t = x0_fn(z, t)
  if solver == "ddim":
    return ddim_x0_step(process, z, x0_t, t, s)
  a_t, n_t = bcast(process.alpha(t), z), bcast(process.sigma(t) / process.alpha(t), z)
  a_s, n_s = bcast(process.alpha(s), z), bcast(process.sigma(s) / process.alpha(s), z)
  y = z / a_t
  d1 = (y - x0_t) / n_t
  y_s = y + (n_s - n_t) * d1
  d2 = (y_s - x0_fn(a_s * y_s, s)) / n_s
  return a_s * (y + (n_s - n_t) * (0.5 * (d1 + d2)))


def consistency_grid(process: Process, num_scales: int, rho: float = 7.0) -> Array:
  """Consistency distillation's `num_scales` times, T to t_min: Karras' grid, uniform in
  (sigma / alpha)^(1 / rho) (the `heun` sampler's default grid)."""
  from jaxdiff import samplers  # samplers does not import losses

  return samplers.default_grid(process, "heun", int(num_scales), rho=float(rho))


def make_consistency_loss(
    process: Process,
    *,
    prediction: str = "eps",
    num_scales: int = 18,
    solver: str = "heun",
    metric: str = "l2",
    sigma_data: float = 0.5,
    rho: float = 7.0,
    reduce: str = "mean",
    clip: tuple[float, float] | None = None,
    lpips_resolution: int = 224,
    data_range: tuple[float, float] | None = None,
) -> Callable[..., tuple[Array, dict[str, Any]]]:
  """Builds consistency distillation's `loss_fn(net, target, teacher, x0, key, metric_params=None)
  -> (loss, aux)`.

  Song et al. (2023), Algorithm 2. For each example an interval `t_{n+1} -> t_n` of
  `consistency_grid(process, num_scales, rho)` is drawn uniformly, `z = alpha x0 + sigma eps`
  at t_{n+1}, the teacher takes one probability-flow ODE step to t_n (`teacher_ode_step` with
  `solver`, no gradient), and the student's consistency function at (z, t_{n+1}) is pulled
  towards the target network's at the teacher's point:

    loss = d(f_net(z, t_{n+1}), stop_gradient(f_target(z', t_n))),

  `f = parameterization.consistency_x0(...)` of each network's denoised estimate (so
  f(x, t_min) = x / alpha exactly), `d` the squared error ('l2', reduced over data dimensions
  by `reduce`), the pseudo-Huber distance `sqrt(||a - b||^2 + c^2) - c`, c = 0.00054
  sqrt(dim) ('pseudo_huber', Song & Dhariwal 2024) or LPIPS ('lpips', Song et al.'s best
  CD metric: `models.lpips.lpips_distance` of the two images mapped from `data_range` to
  [-1, 1] and resized to `lpips_resolution`, 0: their own size; its weights come as
  `metric_params`). At the last interval the target is the teacher's point itself (f at t_min
  is the identity), which anchors the chain to the data.

  Args:
    process: the diffusion process of the teacher (any Gaussian process).
    prediction: what the networks output (the teacher's parameterization).
    num_scales: N, the grid's points (Song et al.: 18 on CIFAR-10, 40 on ImageNet 64).
    solver: the teacher's step, 'heun' (2 evaluations) or 'ddim' (1).
    metric: 'l2', 'pseudo_huber' or 'lpips'.
    sigma_data: the data's standard deviation in the consistency function's c_skip.
    rho: the grid's spacing exponent.
    reduce: 'mean' or 'sum' over data dimensions ('l2' only).
    clip: `(lo, hi)` clips the teacher's x0 to the data range, as its sampler did (None: not).
    lpips_resolution, data_range: LPIPS's input size and the images' range (None: [-1, 1]).

  `net`, `target` and `teacher` are `net(x, c) -> out` with parameters (and conditioning)
  bound: the student, its slowly moving copy (the student itself with target decay 0) and the
  diffusion model. `aux` holds `loss_per_example` and the interval's times `t`, `s`.
  """
  param_lib.check_prediction(prediction)
  for name, value, valid in (("solver", solver, CONSISTENCY_SOLVERS), ("metric", metric, CONSISTENCY_METRICS)):
    if value not in valid:
      raise ConfigError(f"config.distill.{name}={value!r} is not known; valid values are: {', '.join(valid)}.")
  if int(num_scales) < 2:
    raise ConfigError(f"config.distill.num_scales={num_scales} must be >= 2 (the grid's times; Song et al.: 18).")
  if not sigma_data > 0:
    raise ConfigError(f"config.distill.sigma_data={sigma_data} must be > 0 (the data's standard deviation; "
                      f"0.5 for images in [-1, 1]).")
  _check("reduce", reduce, ("mean", "sum"))
  grid = consistency_grid(process, num_scales, rho)

  teacher_x0 = _teacher_denoiser(process, prediction, clip)
  f = _consistency_fn(process, prediction, sigma_data)
  distance = _consistency_metric(metric, reduce, lpips_resolution, data_range, "config.distill.metric='lpips'")

  def loss_fn(net, target, teacher, x0: Array, key: Array, metric_params: Any = None) -> tuple[Array, dict[str, Any]]:
    k_n, k_eps = jax.random.split(key)
    batch = x0.shape[0]
    n = jax.random.randint(k_n, (batch,), 0, grid.shape[0] - 1)
    t, s = grid[n], grid[n + 1]
    z_t = process.marginal(x0, t, jax.random.normal(k_eps, x0.shape, x0.dtype))
    z_s = jax.lax.stop_gradient(teacher_ode_step(process, lambda z, tt: teacher_x0(teacher, z, tt), z_t, t, s,
                                                 solver))
    goal = jax.lax.stop_gradient(f(target, z_s, s))
    per_example = distance(f(net, z_t, t), goal, metric_params)
    return jnp.mean(per_example), {"loss_per_example": per_example, "t": t, "s": s}

  return loss_fn


CT_WEIGHTINGS = ("none", "inverse_gap")
CT_T_SAMPLINGS = ("process", "lognormal")


def consistency_training_scales(step, num_steps: int, scales: tuple[int, int]):
  """Consistency training's grid intervals N at (0-based) update `step` of `num_steps`:
  Song & Dhariwal's (2024) curriculum `min(s0 2^floor(step / K'), s1)`, K' = floor(num_steps /
  (floor(log2(s1 / s0)) + 1)), which doubles N from s0 up to s1 in equal stages.
  `step` may be traced (the train step's `state.step`; the result is then int32)."""
  s0, s1 = int(scales[0]), int(scales[1])
  stages = int(math.floor(math.log2(s1 / s0))) + 1
  per_stage = max(int(num_steps) // stages, 1)
  if isinstance(step, (int, np.integer)):
    return min(s0 * 2 ** min(int(step) // per_stage, stages - 1), s1)
  doublings = jnp.minimum(jnp.asarray(step, jnp.int32) // per_stage, stages - 1)
  return jnp.minimum(s0 * jnp.left_shift(jnp.int32(1), doublings), s1)


def make_consistency_training_loss(
    process: Process,
    *,
    prediction: str = "edm",
    num_steps: int,
    scales: tuple[int, int] = (10, 1280),
    metric: str = "pseudo_huber",
    weighting: str = "inverse_gap",
    t_sampling: str = "lognormal",
    p_mean: float = -1.1,
    p_std: float = 2.0,
    sigma_data: float = 0.5,
    rho: float = 7.0,
    reduce: str = "mean",
    lpips_resolution: int = 224,
    data_range: tuple[float, float] | None = None,
) -> Callable[..., tuple[Array, dict[str, Any]]]:
  """Builds consistency training's `loss_fn(net, target, x0, key, step, metric_params=None) -> (loss, aux)`.

  Consistency training (Song et al. 2023, Algorithm 3) learns a consistency model without a
  teacher: the teacher's ODE step between adjacent grid points is replaced by the same noise
  at both, `z_t = alpha_t x0 + sigma_t eps` and `z_s = alpha_s x0 + sigma_s eps` (the one-sample
  estimate of the score; for a model linear in x its expected gradient is exactly consistency
  distillation's with a DDIM teacher and the exact denoiser), and

    loss = lambda(n) d(f_net(z_t, t), stop_gradient(f_target(z_s, s))),

  with `f = parameterization.consistency_x0(...)`, so f(x, t_min) = x / alpha anchors the chain.
  The defaults are Song & Dhariwal's (2024) improved techniques (iCT): the grid's N intervals
  follow `consistency_training_scales(step, num_steps, scales)` (10 doubling to 1280); interval
  n (levels l_n > l_{n+1}, `samplers.karras_grid_points`) is drawn with probability proportional to
  erf((log l_n - p_mean) / (sqrt2 p_std)) - erf((log l_{n+1} - p_mean) / (sqrt2 p_std))
  ('lognormal'; 'process': uniformly, as Song et al.); lambda = 1 / (l_n - l_{n+1})
  ('inverse_gap'; 'none': 1); d the pseudo-Huber distance `sqrt(||a - b||^2 + c^2) - c`, c =
  0.00054 sqrt(dim) ('pseudo_huber'; 'l2': the squared error reduced by `reduce`; 'lpips':
  LPIPS, as `make_consistency_loss`, with the weights as `metric_params`). The target
  network is the student itself without gradient (iCT) or an EMA of it, and it should see the
  student's dropout mask (`train.consistency_training_step` does). Noise levels are
  `sigma / alpha`, so any Gaussian process works (EDM's are Song & Dhariwal's sigmas).

  `step` (the update's index, may be traced) sets N; `num_steps` is the run's length.
  `aux` holds `loss_per_example`, the interval's times `t`, `s` and `num_scales` (N).
  """
  param_lib.check_prediction(prediction)
  if metric not in CONSISTENCY_METRICS:
    raise ConfigError(f"config.loss.metric={metric!r} is not known; valid values are: "
                      f"{', '.join(CONSISTENCY_METRICS)}.")
  for name, value, valid in (("weighting", weighting, CT_WEIGHTINGS), ("t_sampling", t_sampling, CT_T_SAMPLINGS)):
    if value not in valid:
      raise ConfigError(f"config.loss.{name}={value!r} is not one of consistency training's: {', '.join(valid)} "
                        f"(iCT: weighting='inverse_gap', t_sampling='lognormal').")
  _check("reduce", reduce, ("mean", "sum"))
  s0, s1 = (int(scales[0]), int(scales[1])) if len(scales) == 2 else (0, 0)
  if not 1 <= s0 <= s1:
    raise ConfigError(f"config.loss.scales={tuple(scales)} must be two intervals counts (s0, s1), 1 <= s0 <= s1: "
                      f"the grid starts with s0 intervals and doubles them up to s1 (iCT: (10, 1280); (N, N): "
                      f"a fixed grid).")
  if not sigma_data > 0:
    raise ConfigError(f"config.loss.sigma_data={sigma_data} must be > 0 (the data's standard deviation; "
                      f"0.5 for images in [-1, 1]).")
  if not p_std > 0:
    raise ConfigError(f"config.loss.p_std={p_std} must be > 0 (iCT: 2.0).")
  if isinstance(process, DDPM):
    raise ConfigError("config.loss.objective='consistency' draws times on a continuous grid, but the DDPM process "
                      "has integer steps; use a continuous process, e.g. config.process.name='edm' (iCT) or "
                      "'cosine_vp'.")
  from jaxdiff import samplers  # samplers does not import losses

  slots = jnp.arange(s1)  # interval n joins grid points n and n + 1; those at n >= N are masked out
  f = _consistency_fn(process, prediction, sigma_data)

  distance = _consistency_metric(metric, reduce, lpips_resolution, data_range, "config.loss.metric='lpips'")

  def loss_fn(net, target, x0: Array, key: Array, step, metric_params: Any = None) -> tuple[Array, dict[str, Any]]:
    k_n, k_eps = jax.random.split(key)
    batch = x0.shape[0]
    big_n = consistency_training_scales(step, num_steps, (s0, s1))
    if t_sampling == "lognormal":
      lv = jnp.log(samplers.karras_grid_points(process, jnp.arange(s1 + 1), big_n, rho)[1])
      cdf = jax.scipy.special.erf((lv - p_mean) / (math.sqrt(2.0) * p_std))
      p = cdf[:-1] - cdf[1:]
      logits = jnp.where((slots < big_n) & (p > 0), jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)
      n = jax.random.categorical(k_n, logits, shape=(batch,))
    else:
      n = jax.random.randint(k_n, (batch,), 0, big_n)
    (t, l_t), (s, l_s) = (samplers.karras_grid_points(process, i, big_n, rho) for i in (n, n + 1))
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    goal = jax.lax.stop_gradient(f(target, process.marginal(x0, s, eps), s))
    per_example = distance(f(net, process.marginal(x0, t, eps), t), goal, metric_params)
    if weighting == "inverse_gap":
      per_example = per_example / (l_t - l_s)
    return jnp.mean(per_example), {"loss_per_example": per_example, "t": t, "s": s,
                                   "num_scales": jnp.asarray(big_n, jnp.float32)}

  return loss_fn


def _consistency_fn(process: Process, prediction: str, sigma_data: float):
  """`f(net, z, t)`: a network's consistency function (`parameterization.consistency_x0` of its
  denoised estimate in `prediction`)."""
  def f(net, z, t):
    x0, _, _ = param_lib.predict(net, process, prediction, z, t)
    return param_lib.consistency_x0(process, x0, z, t, sigma_data)
  return f


def _consistency_metric(metric: str, reduce: str, lpips_resolution: int, data_range: tuple[float, float] | None,
                        what: str) -> Callable[[Array, Array, Any], Array]:
  """`distance(a, b, metric_params) -> [B]` of a consistency loss: `_consistency_distance` of
  `a - b`, or LPIPS (`metric='lpips'`) of the images mapped from `data_range` to [-1, 1].
  `what` names the setting that asked for LPIPS in errors."""
  if metric != "lpips":
    return lambda a, b, _: _consistency_distance((a - b).astype(jnp.float32).reshape(a.shape[0], -1), metric, reduce)
  from jaxdiff.models import lpips  # models do not import losses

  lo, hi = data_range or (-1.0, 1.0)

  def distance(a: Array, b: Array, params: Any) -> Array:
    if params is None:
      raise ConfigError(f"{what} needs the LPIPS weights as the loss's metric_params (the training loop "
                        f"passes those of config.lpips.weights).")
    if a.ndim != 4:
      raise ConfigError(f"{what} compares images [B, H, W, C]; this model's outputs are {tuple(a.shape)}.")
    to_unit = lambda v: 2.0 * (v.astype(jnp.float32) - lo) / (hi - lo) - 1.0  # noqa: E731
    return lpips.lpips_distance(params, to_unit(a), to_unit(b), resolution=int(lpips_resolution) or None)

  return distance


def _consistency_distance(diff: Array, metric: str, reduce: str) -> Array:
  """Per example `[B]` of `diff [B, D]`: the squared error ('l2', reduced by `reduce`) or the
  pseudo-Huber distance sqrt(||diff||^2 + c^2) - c, c = 0.00054 sqrt(D) (Song & Dhariwal 2024)."""
  sq = jnp.square(diff)
  if metric == "l2":
    return jnp.mean(sq, axis=-1) if reduce == "mean" else jnp.sum(sq, axis=-1)
  c = 0.00054 * jnp.sqrt(jnp.float32(diff.shape[-1]))
  return jnp.sqrt(jnp.sum(sq, axis=-1) + c * c) - c


REFLOW_SOLVERS = ("heun", "ddim", "dpm_solver++")


def make_reflow_coupling(
    process: Process,
    *,
    prediction: str = "flow",
    solver: str = "heun",
    num_steps: int = 8,
    clip: tuple[float, float] | None = None,
) -> Callable[[Callable, Array, Array], Array]:
  """`couple(teacher, x_T, key) -> x0_hat`: reflow's coupling, the teacher network's (`teacher(x,
  t)`, its conditioning bound) deterministic sampler (`solver`: 'heun', 'ddim' or
  'dpm_solver++', `num_steps` grid times; `samplers.sample`) from `x_T` (the prior's noise) to
  its sample, without gradient. `clip` clips the teacher's x0 estimates to the data range, as
  its sampler did."""
  from jaxdiff import samplers  # samplers does not import losses

  if solver not in REFLOW_SOLVERS:
    raise ConfigError(f"config.distill.solver={solver!r} cannot pair noise with samples for reflow (it needs a "
                      f"deterministic sampler); valid values are: {', '.join(REFLOW_SOLVERS)}.")
  if int(num_steps) < 1:
    raise ConfigError(f"config.distill.teacher_steps={num_steps}: reflow's teacher samples with that many grid "
                      f"times of config.distill.solver={solver!r} to make each pair; set it >= 1, e.g. "
                      f"--config.distill.teacher_steps=8 (the cost of a step grows with it).")

  def couple(teacher: Callable, x_T: Array, key: Array) -> Array:
    score_fn = param_lib.score_fn_from_network(teacher, process, prediction)
    if clip is not None:
      score_fn = param_lib.clip_denoised(score_fn, process, *clip)
    return jax.lax.stop_gradient(samplers.sample(key, process, score_fn, x_T.shape, method=solver,
                                                 num_steps=int(num_steps), x_init=x_T)[0])

  return couple


def make_reflow_loss(
    process: Process,
    *,
    prediction: str = "flow",
    solver: str = "heun",
    num_steps: int = 8,
    clip: tuple[float, float] | None = None,
    **denoising_kw,
) -> Callable[..., tuple[Array, dict[str, Any]]]:
  """Builds reflow's `loss_fn(net, teacher, x0, key, noise=None) -> (loss, aux)` (Liu et al. 2023).

  The teacher's deterministic sampler (`make_reflow_coupling(process, prediction, solver,
  num_steps, clip)`) carries fresh noise `x_T = prior_std eps` to a sample x0_hat, and the
  student is trained with `make_denoising_loss(process, prediction, **denoising_kw)` on the
  coupled pair: `x_t = alpha_t x0_hat + sigma_t eps'` with `eps' = (x_T - alpha_T x0_hat) /
  sigma_T`, the noise whose path passes through the teacher's start at T (eps' = eps up to
  alpha_T, which is ~0). On `RectifiedFlow` this is rectified flow's reflow: the student's
  paths become straight lines from noise to the teacher's samples, on which Euler (`ddim`) is
  exact in one step. On any process the pair makes x0 a function of x_t, so the student's
  x0_hat is constant along each path and `ddim` (eta=0) follows it exactly in any number of
  steps, one included. `x0` (the data batch) gives only the shape: reflow learns from the
  teacher's samples, drawn afresh for each batch.

  With `noise` given, (noise, x0) is a fixed pair that the coupling made once (Liu et al.
  draw a fixed set; `config.distill.pairs`): x_T = noise, x0_hat = x0, and the teacher is not
  called (it may be None).
  """
  couple = make_reflow_coupling(process, prediction=prediction, solver=solver, num_steps=num_steps, clip=clip)
  denoising = make_denoising_loss(process, prediction=prediction, **denoising_kw)

  def loss_fn(net, teacher, x0: Array, key: Array, noise: Array | None = None) -> tuple[Array, dict[str, Any]]:
    k_eps, k_loss = jax.random.split(key)
    if noise is None:
      x_T = process.prior_std * jax.random.normal(k_eps, x0.shape, x0.dtype)
      pair = couple(teacher, x_T, k_eps)
    else:
      x_T, pair = noise.astype(x0.dtype), x0
    # the noise that puts the pair's path through the teacher's start: alpha_T pair + sigma_T eps' = x_T
    t_T = jnp.full((x0.shape[0],), process.T, jnp.float32)
    eps = (x_T - bcast(process.alpha(t_T), x0) * pair) / bcast(process.sigma(t_T), x0)
    return denoising(net, pair, k_loss, eps=eps)

  return loss_fn

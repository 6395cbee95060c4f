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
VAE of latent diffusion): `loss_fn(autoencoder, x, key) -> (loss, aux)`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

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
  """Builds `loss_fn(net, x0, key) -> (loss, aux)`.

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

  def loss_fn(net, x0: Array, key: Array) -> tuple[Array, dict[str, Any]]:
    k_t, k_eps = jax.random.split(key)
    batch = x0.shape[0]
    t = sample_t(k_t, batch)
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


def make_autoencoder_loss(*, kl_weight: float = 1e-6,
                          reconstruction: str = "l1") -> Callable[..., tuple[Array, dict[str, Any]]]:
  """Builds `loss_fn(autoencoder, x, key) -> (loss, aux)` for a KL-regularised autoencoder.

  `autoencoder(x, key) -> (reconstruction, mean, logvar)` decodes a sample of q(z|x) =
  N(mean, exp(logvar)) (`models.AutoencoderKL` with its parameters bound). The loss is

    mean over pixels of |x - x_hat| (l1) or (x - x_hat)^2 (l2)
      + kl_weight * KL(q(z|x) || N(0, I)) / (pixels per example),

  averaged over the batch: Rombach et al.'s objective without its perceptual and
  adversarial terms, divided by the number of pixels, so `kl_weight` means what it does
  there (1e-6 for their KL-f8 autoencoders). `aux` holds the batch means of the
  reconstruction error and of the KL per example (`reconstruction`, `kl`).
  """
  _check("reconstruction", reconstruction, RECONSTRUCTIONS)
  if not kl_weight >= 0.0:
    raise ConfigError(f"config.loss.kl_weight={kl_weight} must be >= 0 (LDM's KL-f8 autoencoders: 1e-6).")
  from jaxdiff.models.autoencoder import kl_divergence

  def loss_fn(autoencoder, x: Array, key: Array) -> tuple[Array, dict[str, Any]]:
    recon, mean, logvar = autoencoder(x, key)
    err = recon.astype(jnp.float32) - x
    rec = jnp.mean(jnp.abs(err) if reconstruction == "l1" else jnp.square(err))
    kl = jnp.mean(kl_divergence(mean, logvar))
    pixels = x.size // x.shape[0]
    return rec + kl_weight * kl / pixels, {"reconstruction": rec, "kl": kl}

  return loss_fn

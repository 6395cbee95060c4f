"""Every sampler against exact scores: mixture statistics, convergence orders, ODE, errors.

The oracle is `synthetic.GaussianMixture`, whose noised marginal (and so its score) is
known in closed form at every t of every process. Tests compile one jitted function per
process (all methods at once) to keep the file fast on a small CPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import processes as P
from jaxdiff import sample, samplers
from jaxdiff.data.synthetic import GaussianMixture
from jaxdiff.errors import InputError

# Unequal weights and widths, so weights, means and spreads are all tested.
MIX = GaussianMixture(means=[[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]], stds=[0.3, 0.5, 0.4],
                      weights=[0.5, 0.3, 0.2])
N = 4000  # samples per method
PROCESSES = {"ddpm": P.DDPM.linear(1000), "vp": P.VP(), "ve": P.VE(), "edm": P.EDM(),
             "rectified_flow": P.RectifiedFlow(shift=3.0)}


def mixture_score(process):
  return lambda x, t: MIX.score(x, process.alpha(t), process.sigma(t))


# --------------------------------------------------------------------------------------
# Statistics against true samples
# --------------------------------------------------------------------------------------

_DIRS = np.random.default_rng(0).standard_normal((64, 2))
_DIRS /= np.linalg.norm(_DIRS, axis=1, keepdims=True)


def sliced_w1(a: np.ndarray, b: np.ndarray) -> float:
  """Sliced Wasserstein-1 over 64 fixed directions between equal-size sample sets."""
  pa, pb = np.sort(a @ _DIRS.T, axis=0), np.sort(b @ _DIRS.T, axis=0)
  return float(np.mean(np.abs(pa - pb)))


def assign(x: np.ndarray) -> np.ndarray:
  """The most probable component of each point under the data distribution."""
  return np.asarray(jnp.argmax(MIX.posterior_weights(jnp.asarray(x, jnp.float32)), axis=-1))


class Reference:
  """Statistics of true samples: component weights/means/stds under `assign`, SW baseline."""

  def __init__(self):
    ref, _ = MIX.sample(200_000, seed=1)
    a = assign(ref)
    self.w = np.bincount(a, minlength=3) / len(a)
    self.mean = np.stack([ref[a == k].mean(0) for k in range(3)])
    self.std = np.stack([ref[a == k].std(0) for k in range(3)])
    self.true, _ = MIX.sample(N, seed=2)
    # SW1 between two independent true sets of N points: pure sampling noise (~0.035).
    self.sw_base = float(np.mean([sliced_w1(MIX.sample(N, seed=10 + i)[0], MIX.sample(N, seed=20 + i)[0])
                                  for i in range(5)]))


_REF = None


def reference() -> Reference:
  global _REF
  if _REF is None:
    _REF = Reference()
  return _REF


SW_FACTOR = 3.0  # bound = 3 x the true-vs-true SW1 of the same sample size (see check_mixture)
Z = 4.0


def check_mixture(x: np.ndarray, name: str) -> list[str]:
  """Problems with samples `x` as a draw from MIX (empty list: none).

  * component weights within 4 standard errors sqrt(w (1 - w) / n) of the true ones;
  * per-component means and standard deviations within 4 standard errors of the true
    samples' (means: std / sqrt(n_k); stds: std / sqrt(2 n_k)), plus 0.01 for the
    float32 / discretization floor;
  * SW1 to N true samples below 3x the SW1 between two independent true sets (0.035 for
    N=4000): an exact sampler's expected SW1 equals the baseline; the factor leaves room for
    seed-to-seed spread (baseline range 0.023-0.047 over 5 seeds) and the methods' O(1/steps)
    discretization and Langevin step-size bias (measured up to ~2.2x for ald), while a
    wrong sampler (a component missing or misplaced) is far above it.
  """
  ref = reference()
  problems = []
  if not np.all(np.isfinite(x)):
    return [f"{name}: non-finite samples"]
  a = assign(x)
  n = len(x)
  w = np.bincount(a, minlength=3) / n
  se_w = np.sqrt(ref.w * (1 - ref.w) / n)
  if np.any(np.abs(w - ref.w) > Z * se_w):
    problems.append(f"{name}: weights {np.round(w, 4)} vs {np.round(ref.w, 4)} "
                    f"(4 SE = {np.round(Z * se_w, 4)})")
  for k in range(3):
    xk = x[a == k]
    if len(xk) < 10:
      problems.append(f"{name}: component {k} has {len(xk)} samples")
      continue
    se_m = ref.std[k] / np.sqrt(len(xk))
    if np.any(np.abs(xk.mean(0) - ref.mean[k]) > Z * se_m + 0.01):
      problems.append(f"{name}: component {k} mean {np.round(xk.mean(0), 3)} vs {np.round(ref.mean[k], 3)}")
    se_s = ref.std[k] / np.sqrt(2 * len(xk))
    if np.any(np.abs(xk.std(0) - ref.std[k]) > Z * se_s + 0.01):
      problems.append(f"{name}: component {k} std {np.round(xk.std(0), 3)} vs {np.round(ref.std[k], 3)}")
  sw = sliced_w1(x, ref.true)
  if sw > SW_FACTOR * ref.sw_base:
    problems.append(f"{name}: SW1 {sw:.4f} > {SW_FACTOR} x baseline {ref.sw_base:.4f}")
  return problems


def test_the_mixture_check_can_fail():
  """The statistics reject samples from slightly wrong distributions."""
  assert check_mixture(MIX.sample(N, seed=7)[0], "true") == []
  wrong_w = GaussianMixture(MIX.means, MIX.stds, [0.45, 0.33, 0.22]).sample(N, seed=7)[0]
  wrong_s = GaussianMixture(MIX.means, MIX.stds * 1.15, MIX.weights).sample(N, seed=7)[0]
  wrong_m = GaussianMixture(MIX.means + [0.1, 0.0], MIX.stds, MIX.weights).sample(N, seed=7)[0]
  for x in (wrong_w, wrong_s, wrong_m):
    assert check_mixture(x, "wrong")


# --------------------------------------------------------------------------------------
# Every method on every process
# --------------------------------------------------------------------------------------


def method_cases(pname: str, process) -> list[tuple[str, str, int | None, dict]]:
  """(label, method, num_steps, options): step counts where each method is accurate."""
  sig_min = float(process.sigma(jnp.asarray([process.t_min]))[0])
  cases = [
      ("ancestral", "ancestral", 200, {}),
      ("ddim", "ddim", 200, {}),
      ("euler_maruyama", "euler_maruyama", 200, {}),
      ("reverse_diffusion", "reverse_diffusion", 200, {}),
      ("pc", "pc", 100, {}),
      # Euler in t is poor on VE's geometric sigma(t): it needs many more steps there.
      ("euler", "euler", 1000 if pname == "ve" else 200, {}),
      ("heun", "heun", 40, {}),
      ("dpm_solver++2", "dpm_solver++", 50, {"order": 2}),
      ("dpm_solver++3", "dpm_solver++", 40, {"order": 3}),
      ("ode", "ode", None, {}),
  ]
  if pname == "vp":
    cases.append(("pc_em", "pc", 100, {"predictor": "euler_maruyama", "n_corrector_steps": 2}))
  if pname in ("vp", "edm"):
    churn = {"s_churn": 20.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.0}
    cases.append(("heun_churn", "heun", 40, churn))
  if pname in ("ve", "edm"):
    # NCSN's relative step, step_lr / sigma_min^2 = 2e-5 / 0.01^2 = 0.2, on 100 geometric levels;
    # 10 steps per level (NCSN: 100). With 0.1 or 5 steps per level, Langevin does not mix
    # where sigma ~ the component widths and the component stds come out 10-15% too wide.
    cases.append(("ald", "ald", 100, {"n_steps_each": 10, "step_lr": 0.2 * sig_min**2}))
  return cases


@pytest.mark.parametrize("pname", sorted(PROCESSES))
def test_every_method_reproduces_the_mixture(pname):
  process = PROCESSES[pname]
  cases = method_cases(pname, process)
  score = mixture_score(process)

  @jax.jit
  def run_all(key):
    out = {}
    for label, method, steps, opts in cases:
      x, info = sample(key, process, score, (N, 2), method=method, num_steps=steps, **opts)
      out[label] = (x, jnp.asarray(info["nfe"]))
    return out

  results = jax.device_get(run_all(jax.random.key(5)))
  problems = []
  for label, method, steps, opts in cases:
    x, nfe = results[label]
    problems += check_mixture(np.asarray(x, np.float64), f"{pname}/{label}")
    if steps is not None:
      m = samplers.METHODS[method]
      want = m.fixed_nfe({**m.options, **opts}, steps)
      if int(nfe) != want:
        problems.append(f"{pname}/{label}: nfe {int(nfe)} != {want}")
  assert not problems, "\n".join(problems)


def test_ddim_eta1_and_ancestral_agree_in_distribution():
  """Independent draws of both are as close as two true sample sets (and both are right)."""
  p = PROCESSES["vp"]
  score = mixture_score(p)
  f = jax.jit(lambda k1, k2: (sample(k1, p, score, (N, 2), method="ddim", eta=1.0, num_steps=200)[0],
                              sample(k2, p, score, (N, 2), method="ancestral", num_steps=200)[0]))
  a, b = (np.asarray(v, np.float64) for v in f(jax.random.key(11), jax.random.key(12)))
  assert check_mixture(a, "ddim eta=1") == [] and check_mixture(b, "ancestral") == []
  assert sliced_w1(a, b) < SW_FACTOR * reference().sw_base


# --------------------------------------------------------------------------------------
# Exactness of single updates
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pname", ["ddpm", "ve", "edm"])
def test_ddim_eta0_is_euler_in_x_over_alpha_and_dpm_solver_order1(pname):
  """DDIM(eta=0) = Euler step of dy/dsigma_tilde = eps_hat (y = x/alpha, sigma_tilde = sigma/alpha)
  = first-order DPM-Solver++, on any grid of any process."""
  p = PROCESSES[pname]
  score = jax.jit(mixture_score(p))  # the reference loops below run eagerly
  ts = samplers.default_grid(p, "ddim", 6)
  x = p.prior_std * jax.random.normal(jax.random.key(0), (32, 2))
  got = sample(jax.random.key(1), p, score, (32, 2), method="ddim", ts=ts, denoise=False, x_init=x)[0]
  dpm1 = sample(jax.random.key(1), p, score, (32, 2), method="dpm_solver++", order=1, ts=ts, denoise=False,
                x_init=x)[0]
  y = x
  for t, s in zip(ts[:-1], ts[1:]):
    tt, ss = jnp.full((32,), t), jnp.full((32,), s)
    a_t, a_s = p.alpha(tt)[:, None], p.alpha(ss)[:, None]
    eps = -p.sigma(tt)[:, None] * score(y, tt)
    y = (y / a_t + (p.sigma(ss)[:, None] / a_s - p.sigma(tt)[:, None] / a_t) * eps) * a_s
  scale = float(jnp.max(jnp.abs(y))) + 1.0
  np.testing.assert_allclose(got, y, atol=2e-5 * scale)
  np.testing.assert_allclose(dpm1, y, atol=2e-5 * scale)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ddim_on_rectified_flow_is_the_flow_matching_euler_sampler(shift):
  """On the straight path DDIM(eta=0) is x_s = x_t + (sigma_s - sigma_t) u_hat, u_hat = eps_hat - x0_hat:
  Euler on dx/dsigma = u (= dx/dt for shift 1), the sampler of Lipman et al. / SD3, and a
  denoiser that is exact for one data point takes it there in one step."""
  p = P.RectifiedFlow(shift=shift)
  score = jax.jit(mixture_score(p))
  ts = p.default_grid(6)
  x = p.prior_std * jax.random.normal(jax.random.key(0), (32, 2))
  got = sample(jax.random.key(1), p, score, (32, 2), method="ddim", ts=ts, denoise=False, x_init=x)[0]
  y = x
  for t, s in zip(ts[:-1], ts[1:]):
    tt = jnp.full((32,), t)
    a, sig = p.alpha(tt)[:, None], p.sigma(tt)[:, None]
    eps = -sig * score(y, tt)
    u = eps - (y - sig * eps) / a
    y = y + (p.sigma(jnp.full((32,), s))[:, None] - sig) * u
  np.testing.assert_allclose(got, y, atol=2e-4 * (float(jnp.max(jnp.abs(y))) + 1.0))
  # one data point: its flow is a straight line, x_t = alpha_t x0 + sigma_t eps, and one step is exact
  x0 = jnp.asarray([[0.5, -1.5]])
  point_score = lambda x, t: -(x - p.alpha(t)[:, None] * x0) / p.sigma(t)[:, None] ** 2
  one = sample(jax.random.key(2), p, point_score, (32, 2), method="ddim", num_steps=2, denoise=False,
               x_init=x)[0]
  (a_T, a_0), (s_T, s_0) = p.alpha(ts[::5]), p.sigma(ts[::5])
  # (float32: x0_hat = (x - sigma eps_hat) / alpha at alpha(T) = 1e-3 loses ~3 digits through the score)
  np.testing.assert_allclose(one, a_0 * x0 + s_0 / s_T * (x - a_T * x0), atol=5e-4)


def test_heun_on_edm_is_karras_algorithm_2():
  """Karras et al. (2022) Algorithm 2 written out, driven by the sampler's noise draws."""
  p = PROCESSES["edm"]
  score = jax.jit(mixture_score(p))  # the reference loops below run eagerly
  opts = dict(s_churn=30.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
  n, key = 10, jax.random.key(3)
  got, info = sample(key, p, score, (16, 2), method="heun", num_steps=n, **opts)
  assert info["nfe"] == 2 * (n - 1) + 1
  sig = np.asarray(p.default_grid(n), np.float64)  # Karras' rho=7 sigmas
  np.testing.assert_allclose(samplers.default_grid(p, "heun", n), sig, rtol=1e-5)
  k_init, k_loop = jax.random.split(key)
  x = np.asarray(p.prior_sample(k_init, (16, 2)), np.float64)
  denoiser = lambda x, s: x + s**2 * np.asarray(score(jnp.asarray(x, jnp.float32), jnp.full((16,), s)))
  sig = np.append(sig, 0.0)
  for i in range(n):
    t_cur, t_next = sig[i], sig[i + 1]
    gamma = min(opts["s_churn"] / n, math.sqrt(2) - 1) if opts["s_tmin"] <= t_cur <= opts["s_tmax"] else 0.0
    t_hat = t_cur + gamma * t_cur
    if gamma > 0:
      z = np.asarray(jax.random.normal(jax.random.fold_in(k_loop, i), (16, 2)), np.float64)
      x = x + math.sqrt(t_hat**2 - t_cur**2) * opts["s_noise"] * z
    d = (x - denoiser(x, t_hat)) / t_hat
    x_next = x + (t_next - t_hat) * d
    if t_next != 0:
      d2 = (x_next - denoiser(x_next, t_next)) / t_next
      x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
    x = x_next
  np.testing.assert_allclose(got, x, atol=2e-3)


def test_pc_and_ald_follow_score_sde_and_ncsn():
  """One pc step on VE (Langevin corrector + reverse diffusion) and NCSN's Algorithm 1."""
  p = PROCESSES["ve"]
  score = jax.jit(mixture_score(p))  # the reference loops below run eagerly
  ts = jnp.asarray([0.6, 0.4, 0.2])
  key = jax.random.key(9)
  x0 = jnp.asarray(MIX.sample(64, seed=3)[0]) * 3.0
  _, k_loop = jax.random.split(key)
  sc = lambda x, t: score(x, jnp.full((64,), t))

  def corrector(x, t, k):
    g = sc(x, t)
    z = jax.random.normal(jax.random.fold_in(k, 0), x.shape)
    eps = 2 * (0.16 * jnp.mean(jnp.linalg.norm(z, axis=-1)) / jnp.mean(jnp.linalg.norm(g, axis=-1))) ** 2
    return x + eps * g + jnp.sqrt(2 * eps) * z

  got = sample(key, p, score, (64, 2), method="pc", ts=ts, denoise=False, x_init=x0)[0]
  x = x0
  for i in range(2):
    k_corr, k_pred = jax.random.split(jax.random.fold_in(k_loop, i))
    x = corrector(x, ts[i], k_corr)
    v = p.sigma(ts[i]) ** 2 - p.sigma(ts[i + 1]) ** 2  # SMLD discretization: f = 0, G^2 = v
    x = x + v * sc(x, ts[i]) + jnp.sqrt(v) * jax.random.normal(k_pred, x.shape)
  x = corrector(x, ts[2], jax.random.fold_in(k_loop, 2))
  np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)

  got = sample(key, p, score, (64, 2), method="ald", ts=ts, denoise=False, x_init=x0, n_steps_each=3,
               step_lr=1e-3)[0]
  x = x0
  for i in range(3):
    step = 1e-3 * (p.sigma(ts[i]) / p.sigma(ts[-1])) ** 2
    k = jax.random.fold_in(k_loop, i)
    for j in range(3):
      z = jax.random.normal(jax.random.fold_in(k, j), x.shape)
      x = x + 0.5 * step * sc(x, ts[i]) + jnp.sqrt(step) * z
  np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# Convergence orders of the deterministic ODE samplers
# --------------------------------------------------------------------------------------

G_MU = jnp.asarray([1.0, -0.5])
G_STD = jnp.asarray([0.5, 0.2])


def gaussian_score(process):
  def score(x, t):
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    return -(x - a * G_MU) / (a**2 * G_STD**2 + s**2)

  return score


def gaussian_flow(process, x_T, t0, t1):
  """Exact PF-ODE solution for N(G_MU, diag G_STD^2) data: (x - alpha mu) / sqrt(var_t) is constant."""
  def coef(t):
    a, s = process.alpha(jnp.asarray([t])), process.sigma(jnp.asarray([t]))
    return a, jnp.sqrt(a**2 * G_STD**2 + s**2)

  a0, v0 = coef(t0)
  a1, v1 = coef(t1)
  return a1 * G_MU + v1 / v0 * (x_T - a0 * G_MU)


def errors_vs_steps(process, score, ref, x_T, method, steps, **opts):
  @jax.jit
  def run(x):
    return [sample(jax.random.key(0), process, score, x.shape, method=method, num_steps=n, x_init=x,
                   denoise=False, **opts)[0] for n in steps]

  return [float(jnp.sqrt(jnp.mean((x - ref) ** 2))) for x in run(x_T)]


def fitted_order(steps, errs) -> float:
  return -float(np.polyfit(np.log(steps), np.log(errs), 1)[0])


# method, process, options, step counts, accepted slope range. Measured (Gaussian data):
# euler 0.96, heun 2.12 (VP and EDM), 2M 1.97, 3M 4.04 (3M beats its order on this range for
# Gaussian data; on the mixture below it fits 3.01).
ORDER_CASES = [
    ("euler", "vp", {}, [16, 32, 64, 128], (0.85, 1.2)),
    ("heun", "vp", {}, [16, 32, 64, 128], (1.8, 2.5)),
    ("heun", "edm", {}, [16, 32, 64, 128], (1.8, 2.5)),
    ("dpm_solver++", "vp", {"order": 2}, [16, 32, 64, 128], (1.7, 2.4)),
    ("dpm_solver++", "vp", {"order": 3}, [16, 32, 64], (2.7, 4.6)),
]


@pytest.mark.parametrize("method,pname,opts,steps,bounds", ORDER_CASES,
                         ids=[f"{c[0]}{c[2].get('order', '')}-{c[1]}" for c in ORDER_CASES])
def test_convergence_order_against_the_exact_flow(method, pname, opts, steps, bounds):
  p = PROCESSES[pname]
  x_T = p.prior_std * jax.random.normal(jax.random.key(0), (64, 2))
  ref = gaussian_flow(p, x_T, p.T, p.t_min)
  errs = errors_vs_steps(p, gaussian_score(p), ref, x_T, method, steps, **opts)
  order = fitted_order(steps, errs)
  assert np.all(np.diff(errs) < 0), errs
  assert bounds[0] < order < bounds[1], (order, errs)


def test_dpm_solver_3m_is_third_order_on_the_mixture():
  """Against a 2000-step 3M reference (its own error ~1e-5, below every error fitted)."""
  p = PROCESSES["vp"]
  score = mixture_score(p)
  x_T = jax.random.normal(jax.random.key(0), (64, 2))
  ref = jax.jit(lambda x: sample(jax.random.key(0), p, score, x.shape, method="dpm_solver++", order=3,
                                 num_steps=2000, x_init=x, denoise=False)[0])(x_T)
  steps = [16, 32, 64]
  errs = errors_vs_steps(p, score, ref, x_T, "dpm_solver++", steps, order=3)
  assert 2.7 < fitted_order(steps, errs) < 3.6, errs


# --------------------------------------------------------------------------------------
# The adaptive ODE sampler
# --------------------------------------------------------------------------------------


def test_ode_matches_a_fine_fixed_step_solve_and_nfe_falls_with_tolerance():
  p = PROCESSES["vp"]
  score = mixture_score(p)
  x_T = jax.random.normal(jax.random.key(0), (64, 2))

  @jax.jit
  def run(x):
    fine = sample(jax.random.key(0), p, score, x.shape, method="dpm_solver++", order=3, num_steps=500,
                  x_init=x, denoise=False)[0]
    odes = [sample(jax.random.key(0), p, score, x.shape, method="ode", rtol=tol, atol=tol, x_init=x,
                   denoise=False) for tol in (1e-5, 1e-4, 1e-3)]
    return fine, [(o[0], o[1]["nfe"]) for o in odes]

  fine, odes = run(x_T)
  errs = [float(jnp.max(jnp.abs(x - fine))) for x, _ in odes]
  nfes = [int(n) for _, n in odes]
  assert errs[0] < 2e-3, errs  # the solve is accurate at rtol = atol = 1e-5
  assert nfes[0] > nfes[1] > nfes[2], nfes  # and cheaper at looser tolerances
  assert errs[2] > errs[0], errs


def test_reported_nfe_is_the_number_of_network_calls():
  """info['nfe'] equals a runtime count of score evaluations (the adaptive ode included)."""
  p = PROCESSES["edm"]
  base = mixture_score(p)
  cases = [("ode", {}), ("ode", {"solver": "dopri5", "rtol": 1e-3, "atol": 1e-3}), ("heun", {"s_churn": 5.0}),
           ("pc", {"n_corrector_steps": 2}), ("ald", {"n_steps_each": 3, "step_lr": 1e-7}),
           ("dpm_solver++", {"order": 3}), ("euler_maruyama", {})]
  calls = [0] * len(cases)

  def counting_score(i):
    def count():
      calls[i] += 1

    def score(x, t):
      jax.debug.callback(count)
      return base(x, t)

    return score

  @jax.jit
  def run(key):
    return [sample(key, p, counting_score(i), (8, 2), method=m, num_steps=6, **o)[1]["nfe"]
            for i, (m, o) in enumerate(cases)]

  nfes = jax.block_until_ready(run(jax.random.key(0)))
  jax.effects_barrier()
  assert calls == [int(n) for n in nfes], (cases, calls, nfes)
  assert calls[2:] == [2 * 5 + 1, 3 * 5 + 2 + 1, 3 * 6 + 1, 6, 6]  # fixed-step counts by hand


# --------------------------------------------------------------------------------------
# Compilation, shapes, info
# --------------------------------------------------------------------------------------


def all_method_calls(p):
  calls = [(m, {}) for m in sorted(samplers.METHODS) if m != "ald"]
  calls += [("heun", {"s_churn": 1.0}), ("pc", {"predictor": "ddim", "eta": 0.5})]
  if isinstance(p, (P.VE, P.EDM)):
    calls.append(("ald", {"n_steps_each": 2, "step_lr": 1e-7}))
  return calls


def test_every_method_on_images_compiles_once():
  """Image-shaped x, all methods in one jitted function: a second key does not retrace."""
  p = PROCESSES["edm"]
  traces = []

  def score(x, t):
    traces.append(1)
    return -x / (1.0 + t[:, None, None, None] ** 2)

  calls = all_method_calls(p)
  f = jax.jit(lambda k: [sample(k, p, score, (2, 4, 4, 3), method=m, num_steps=4, **o) for m, o in calls])
  out = f(jax.random.key(0))
  n = len(traces)
  assert n > 0
  out2 = f(jax.random.key(1))
  assert len(traces) == n and f._cache_size() == 1
  for (m, _), (x, info), (x2, _) in zip(calls, out, out2):
    assert x.shape == (2, 4, 4, 3) and x.dtype == jnp.float32, m
    assert bool(jnp.all(jnp.isfinite(x))), m
    assert all(isinstance(v, (int, jax.Array)) for v in info.values()), (m, info)
    assert not np.allclose(x, x2), m  # a new key draws a new x_T (and new noise)


def test_grid_defaults():
  """heun: rho=7 in sigma/alpha (EDM's own grid); dpm_solver++: uniform in log-SNR; both from T to t_min."""
  for p in PROCESSES.values():
    for method in ("heun", "dpm_solver++"):
      ts = np.asarray(samplers.default_grid(p, method, 12), np.float64)
      assert ts[0] == pytest.approx(p.T) and ts[-1] == pytest.approx(p.t_min, rel=1e-6)
      assert np.all(np.diff(ts) < 0), (p, method, ts)
    lam = np.asarray(p.log_snr(samplers.default_grid(p, "dpm_solver++", 12)), np.float64)
    np.testing.assert_allclose(np.diff(lam), np.diff(lam).mean(), rtol=2e-3, atol=2e-3)
  edm = PROCESSES["edm"]
  np.testing.assert_allclose(samplers.default_grid(edm, "heun", 18), edm.default_grid(18), rtol=1e-5)
  np.testing.assert_allclose(samplers.default_grid(edm, "dpm_solver++", 5, grid="time"), edm.default_grid(5))


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_bad_input_names_the_argument_and_the_fix():
  key = jax.random.key(0)
  vp, ve, edm = PROCESSES["vp"], PROCESSES["ve"], PROCESSES["edm"]
  score = lambda x, t: -x

  def call(p=vp, method="ddim", **kw):
    kw.setdefault("num_steps", 4)
    return sample(key, p, score, (4, 2), method=method, **kw)

  valid = r"valid methods are: .*ald.*dpm_solver\+\+.*euler_maruyama.*heun.*ode.*pc"
  with pytest.raises(InputError, match=valid):
    call(method="dpm_solver")
  with pytest.raises(InputError, match=r"\[.snr.\] are not known for method=.heun.; its options are: rho"):
    call(method="heun", snr=0.1)
  with pytest.raises(InputError, match="alpha\\(t\\) = 1.*not VP.*method='pc'"):
    call(method="ald")
  with pytest.raises(InputError, match="step_lr=2e-05 is too large.*sigma_L=0.002.*step_lr <= 8e-07"):
    call(p=edm, method="ald")
  with pytest.raises(InputError, match="step_lr=0.05 is too large.*sigma_L=0.08408"):  # the grid's last level
    call(p=ve, method="ald", ts=jnp.asarray([0.9, 0.5, 0.25]), step_lr=0.05)
  call(p=ve, method="ald", n_steps_each=1)  # NCSN's defaults are fine on VE
  with pytest.raises(InputError, match="predictor='ddpm' is not known; valid values are: 'ancestral'"):
    call(method="pc", predictor="ddpm")
  with pytest.raises(InputError, match="order=4 is not known"):
    call(method="dpm_solver++", order=4)
  with pytest.raises(InputError, match="grid='karras'"):
    call(method="dpm_solver++", grid="karras")
  with pytest.raises(InputError, match="solver='rk4'.*'tsit5', 'dopri5'"):
    call(method="ode", solver="rk4")
  with pytest.raises(InputError, match="rtol=0 must be a number > 0"):
    call(method="ode", rtol=0)
  with pytest.raises(InputError, match="n_corrector_steps=1.5 must be an integer"):
    call(method="pc", n_corrector_steps=1.5)
  with pytest.raises(InputError, match="s_tmax=0.1 must be >= s_tmin=1"):
    call(method="heun", s_tmin=1.0, s_tmax=0.1)
  with pytest.raises(InputError, match="eta=-1"):
    call(method="ddim", eta=-1.0)
  with pytest.raises(InputError, match="strictly decreasing"):
    call(method="heun", ts=jnp.asarray([0.5, 0.5, 0.1]))
  with pytest.raises(InputError, match=r"\[t_min, T\] = \[0.001, 1\]"):
    call(method="dpm_solver++", ts=jnp.asarray([1.5, 0.5]))
  with pytest.raises(InputError, match="at least 2 times"):
    call(method="ode", ts=jnp.asarray([0.5]))
  with pytest.raises(InputError, match="shape and dtype"):
    sample(key, vp, lambda x, t: x.astype(jnp.float16), (4, 2), method="heun", num_steps=3)
  with pytest.raises(InputError, match="shape and dtype"):
    sample(key, vp, lambda x, t: x[:, :1], (4, 2), method="ode")
  # ode runs out of steps: a runtime error (raised inside jit too) naming max_steps and rtol/atol
  with pytest.raises(Exception, match="max_steps=3 solver steps at rtol=1e-05.*raise max_steps or loosen"):
    jax.block_until_ready(sample(key, vp, mixture_score(vp), (4, 2), method="ode", max_steps=3)[0])

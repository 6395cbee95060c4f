"""Distillation and consistency models. Progressive: the target against the sampler, learning on the
exact mixture teacher, rounds and resume through run_train's loop, and the config errors.
Consistency distillation: the loss at the exact flow map of Gaussian data, the sampler, learning
on the exact mixture teacher, the run through run_train's loop and run_sample, and its errors.
Reflow: the coupling at the closed-form straight student, and the run. Consistency training (no
teacher): its gradient against distillation's from the exact teacher, the curriculum and draws,
learning the mixture from data, and the run."""

import functools
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import load_config
from jaxdiff import distill, evaluate, losses, processes, samplers, sharding, train
from jaxdiff import parameterization as param_lib
from jaxdiff import checkpoint as ckpt_lib
from jaxdiff.data import synthetic
from jaxdiff.errors import ConfigError, DataError
from jaxdiff.models import MLP
from jaxdiff.processes import bcast

CONTINUOUS = {"cosine_vp": processes.CosineVP(), "vp": processes.VP(), "subvp": processes.SubVP(),
              "ve": processes.VE(), "rectified_flow": processes.RectifiedFlow()}


def _x0_from(fn, process):
  """A score function whose denoised estimate at (x, t) is `fn(x, t)`."""
  def score(x, t):
    a, s = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
    return -((x - a * fn(x, t)) / s) / s
  return score


@pytest.mark.parametrize("pname", sorted(CONTINUOUS) + ["ddpm", "edm"])
def test_one_student_step_to_the_target_lands_where_two_teacher_steps_do(pname):
  """With x0 = distillation_target, the sampler's own DDIM step from z_t reaches the teacher's
  z_t'' (two DDIM steps of the sampler through the midpoint), for the first, a middle and
  the last interval of the grid; the loss draws its times on those grids (DDPM's integer
  steps and EDM's rho-grid too)."""
  process = {"ddpm": processes.DDPM.linear(num_timesteps=1000), "edm": processes.EDM(), **CONTINUOUS}[pname]
  key = jax.random.key(0)
  w = jax.random.normal(key, (3, 3))
  teacher_x0 = lambda x, t: jnp.tanh(x @ w) * (1.0 + bcast(t, x))  # any smooth nonlinear denoiser
  n = 4
  grid = np.asarray(process.default_grid(2 * n + 1))  # the teacher's grid: the student's + midpoints
  z = 2.0 * jax.random.normal(jax.random.fold_in(key, 1), (5, 3))
  for j in (0, 1, n - 1):
    t, mid, end = grid[2 * j], grid[2 * j + 1], grid[2 * j + 2]
    z_end, _ = samplers.sample(key, process, _x0_from(teacher_x0, process), z.shape, method="ddim",
                               ts=jnp.asarray([t, mid, end]), x_init=z, denoise=False)
    target = losses.distillation_target(process, z, z_end, jnp.full((5,), t), jnp.full((5,), end))
    one, _ = samplers.sample(key, process, _x0_from(lambda x, tt: target, process), z.shape, method="ddim",
                             ts=jnp.asarray([t, end]), x_init=z, denoise=False)
    np.testing.assert_allclose(one, z_end, rtol=2e-4, atol=2e-4 * float(process.sigma(t)))
    # and the loss's own two steps are the sampler's
    tt, tm, te = (jnp.full((5,), v) for v in (t, mid, end))
    z_mid = losses.ddim_x0_step(process, z, teacher_x0(z, tt), tt, tm)
    np.testing.assert_allclose(losses.ddim_x0_step(process, z_mid, teacher_x0(z_mid, tm), tm, te), z_end,
                               rtol=1e-4, atol=1e-5)
  # the student's grid nests in the teacher's: sampling the student with N + 1 points hits the targets' times
  np.testing.assert_allclose(process.default_grid(n + 1), grid[::2], rtol=1e-6, atol=1e-6)
  distill.check_process(process)
  # the loss's times: the student's grid points, each example's interval drawn among the N
  loss_fn = losses.make_distillation_loss(process, prediction="x0")
  _, aux = loss_fn(lambda x, c: jnp.tanh(x), lambda x, c: jnp.tanh(x), jnp.ones((64, 3)), key, n)
  on_grid = np.min(np.abs(np.asarray(aux["t"])[:, None] - grid[None, 0:-1:2]), axis=1)
  assert np.all(on_grid <= 1e-5 * max(1.0, float(process.T))), (pname, np.asarray(aux["t"]))
  assert len(set(np.round(np.asarray(aux["t"]), 4).tolist())) == n  # all N intervals drawn from 64 examples


def _exact_mixture_v(process, gmm):
  """The exact teacher for mixture data: its denoiser in the v-parameterization, as a network of
  the input c = 999 t."""
  def exact_v(x, c):
    t = c / 999.0
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    eps = -s * gmm.score(x, process.alpha(t), process.sigma(t))
    return a * eps - s * (x - s * eps) / a
  return exact_v


def test_distilled_mlp_takes_in_one_step_what_the_exact_teacher_takes_in_two():
  """The exact mixture denoiser as teacher (2 DDIM steps), a small MLP student trained for 1 step:
  its 1-step samples are 100x nearer the teacher's 2-step ones, from the same noise, than the
  teacher's own 1-step samples are (measured: 7e-5 against 1.9), and as likely under the data
  (the mixture's exact log-density; 2 DDIM steps are far from the data: -15 against -86 for 1)."""
  process, gmm = processes.CosineVP(), synthetic.gmm2d()
  exact_v = _exact_mixture_v(process, gmm)

  model = MLP(hidden=128, num_layers=2, time_dim=32)
  params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
  loss_fn = losses.make_distillation_loss(process, prediction="v")
  opt = optax.adam(optax.cosine_decay_schedule(3e-3, 600))
  opt_state = opt.init(params)
  data = jnp.asarray(gmm.sample(600 * 256, seed=1)[0]).reshape(600, 256, 2)

  @jax.jit
  def step(params, opt_state, x0, key):
    def objective(p):
      return loss_fn(lambda x, c: model.apply({"params": p}, x, c), exact_v, x0, key, 1)[0]
    loss, g = jax.value_and_grad(objective)(params)
    upd, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, loss

  first = None
  for i in range(600):
    params, opt_state, loss = step(params, opt_state, data[i], jax.random.key(i))
    first = float(loss) if first is None else first
  assert float(loss) < 0.2 * first, (first, float(loss))

  def v_score(net):
    def score(x, t):
      a, s = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
      out = net(x, process.noise_cond(t))
      eps = (s * x + a * out) / (a**2 + s**2)
      return -eps / s
    return score

  key = jax.random.key(7)
  shape = (2000, 2)
  kw = dict(method="ddim", denoise=False)
  teacher2, _ = samplers.sample(key, process, v_score(exact_v), shape, num_steps=3, **kw)
  teacher1, _ = samplers.sample(key, process, v_score(exact_v), shape, num_steps=2, **kw)
  student1, _ = samplers.sample(key, process, v_score(lambda x, c: model.apply({"params": params}, x, c)), shape,
                                num_steps=2, **kw)
  err_student = float(jnp.mean(jnp.sum((student1 - teacher2) ** 2, -1)))
  err_teacher = float(jnp.mean(jnp.sum((teacher1 - teacher2) ** 2, -1)))
  logp = lambda x: float(jnp.mean(gmm.log_prob(x)))
  assert err_student < 1e-2 * err_teacher, (err_student, err_teacher)

  assert logp(student1) > logp(teacher1) + 1.0, (logp(student1), logp(teacher1), logp(teacher2))
  assert abs(logp(student1) - logp(teacher2)) < 0.5, (logp(student1), logp(teacher2))


def _tiny(**distill_kw):
  c = load_config("tiny")
  c.process = ml_collections.ConfigDict(dict(name="cosine_vp"))
  c.loss.prediction = "v"
  c.training.update(num_final_samples=0)
  if distill_kw:
    c.distill.update(**distill_kw)
    c.sampling.update(num_steps=1 + (distill_kw["teacher_steps"] >> (c.training.num_steps // distill_kw[
        "steps_per_round"])), denoise=False)
  return c


def _state(workdir, config, step):
  exp = train.build_experiment(config)
  mesh = sharding.create_mesh(config.mesh.to_dict())
  opt = train.make_optimizer(**config.optimizer.to_dict(), num_steps=config.training.num_steps)
  _, abstract, _ = train.abstract_train_state(config, exp, opt, mesh)
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    return jax.device_get(ck.restore(abstract, step=step)[1])
  finally:
    ck.close()


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def tiny_teacher(tfds_dir, tmp_path_factory):
  """(config, workdir) of configs/mnist_distill.py:tiny_teacher, trained once for this module."""
  config = load_config("mnist_distill", "tiny_teacher")
  config.data.data_dir = tfds_dir
  workdir = str(tmp_path_factory.mktemp("distill") / "teacher")
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_rounds_hand_the_student_over_and_a_resumed_run_matches(tfds_dir, tiny_teacher, tmp_path):
  """configs/mnist_distill.py:tiny_teacher, then :tiny (class-conditional, 8 -> 4 -> 2 steps in two
  rounds of 2 updates): each round's teacher, the metrics, a resume across the round's end (in
  calls of 2 steps) and the 2-evaluation sampler of run_sample.py."""
  from jaxdiff import generate

  teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
  teacher_config = tiny_teacher[0]
  shutil.copytree(tiny_teacher[1], teacher_dir)  # deleted below
  config = load_config("mnist_distill", "tiny")
  config.data.data_dir, config.distill.teacher = tfds_dir, teacher_dir
  out = train.train_and_evaluate(config, student_dir)
  assert out["student_steps"] == 2.0  # 8 teacher steps, two halvings
  rows = [json.loads(line) for line in open(os.path.join(student_dir, "metrics.jsonl"))]
  assert [r["student_steps"] for r in rows] == [4.0, 2.0]
  teacher = _state(teacher_dir, teacher_config, 4)
  s2, s4 = _state(student_dir, config, 2), _state(student_dir, config, 4)
  _assert_trees_equal(s2.teacher_params, teacher.ema_params)  # round 1: the teacher run
  _assert_trees_equal(s4.teacher_params, s2.ema_params)  # round 2: round 1's student (EMA)
  assert not np.array_equal(jax.tree.leaves(s2.params)[0], jax.tree.leaves(teacher.ema_params)[0])

  # interrupted after round 1 (its last checkpoint removed), resumed in calls of 2 steps: the same run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(student_dir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  shutil.rmtree(teacher_dir)  # the teacher is in the checkpoint: a resume does not read its run
  config.training.steps_per_call = 2
  train.train_and_evaluate(config, resumed)
  r4 = _state(resumed, config, 4)
  for x, y in zip(jax.tree.leaves(r4), jax.tree.leaves(s4), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)

  result = generate.generate(generate.load_config(resumed), resumed, num_samples=8, out_dir=str(tmp_path / "s"))
  assert result["nfe"] == 2 and result["method"] == "ddim"


def test_progressive_distillation_of_a_ddpm_teacher(tiny_run, tmp_path):
  """configs/tiny.py's DDPM run (integer steps, eps-prediction) as teacher: a round halves its 4
  DDIM steps to 2 on DDPM's own grid (the one the student's sampler, DDIM with 3 points, takes)."""
  config = load_config("tiny")
  config.distill.update(teacher=tiny_run[1], teacher_steps=4, steps_per_round=2)
  config.training.update(num_steps=2, num_final_samples=0)
  config.sampling.update(method="ddim", num_steps=3, denoise=False)
  out = train.train_and_evaluate(config, str(tmp_path / "student"))
  assert out["student_steps"] == 2.0 and np.isfinite(out["loss"])
  grid = np.asarray(processes.get_process(**config.process.to_dict()).default_grid(3))
  np.testing.assert_array_equal(grid, [100.0, 50.0, 1.0])  # the tiny DDPM's steps 100, round(50.5) = 50, 1


def test_config_errors_name_the_key_and_the_fix(tmp_path):
  from jaxdiff import configs as config_lib

  def err(config):
    with pytest.raises(ConfigError) as e:
      config_lib.validate(config)
    return str(e.value)

  ok = _tiny(teacher="/nowhere", teacher_steps=8, steps_per_round=2)
  config_lib.validate(ok)  # numbers only: the teacher run is read when training starts
  for process, prediction in ((dict(name="ddpm", num_timesteps=100), "eps"), (dict(name="edm"), "edm")):
    c = _tiny(teacher="/nowhere", teacher_steps=8, steps_per_round=2)  # DDPM's integer steps, EDM's rho-grid
    c.process, c.loss.prediction = ml_collections.ConfigDict(process), prediction
    config_lib.validate(c)

  class Warped(processes.CosineVP):  # a grid that is not a fixed function of the fraction: no halving
    def default_grid(self, num_steps):
      return jnp.linspace(self.T, self.t_min, num_steps) ** (1.0 + 1.0 / num_steps)

  with pytest.raises(ConfigError, match=r"Warped process's default_grid\(5\) is not every other point"):
    distill.check_process(Warped())
  c = _tiny(teacher="/nowhere", teacher_steps=8, steps_per_round=3)
  assert "num_steps=4" in err(c) and "steps_per_round=3" in err(c)
  c = _tiny(teacher="/nowhere", teacher_steps=6, steps_per_round=1)  # 4 rounds: 6 cannot halve 4 times
  c.sampling.num_steps = 2
  assert "teacher_steps=6" in err(c) and "multiple of 16" in err(c)
  c = _tiny(teacher="/nowhere", teacher_steps=8, steps_per_round=2)
  c.sampling.num_steps = 5
  assert "--config.sampling.num_steps=3" in err(c) and "--config.sampling.denoise=False" in err(c)
  c = _tiny(teacher="/nowhere", teacher_steps=8, steps_per_round=2)
  c.training.init_from = "diffusers:/x"
  with pytest.raises(ConfigError, match="init_from"):
    distill.validate(c)
  c = _tiny(teacher="/nowhere", teacher_steps=8, steps_per_round=2)
  c.distill.weighting = "snr"
  with pytest.raises(ConfigError, match="config.distill.weighting='snr'"):
    train.make_loss(c, processes.CosineVP())

  # the teacher run must be the student's network, process and inputs
  teacher = _tiny()
  student = _tiny(teacher="/t", teacher_steps=8, steps_per_round=2)
  student.model.dropout = 0.1  # free
  distill.check_teacher(student, teacher)
  student.model.ch = 16
  student.loss.prediction = "eps"
  with pytest.raises(ConfigError) as e:
    distill.check_teacher(student, teacher)
  assert "model.ch: 16 here, 8 in the teacher" in str(e.value) and "loss.prediction" in str(e.value)
  # a teacher workdir that holds no run
  c = _tiny(teacher=str(tmp_path / "empty"), teacher_steps=8, steps_per_round=2)
  with pytest.raises(Exception, match="empty"):
    train.train_and_evaluate(c, str(tmp_path / "student"))

  assert [distill.student_steps(8, s, 2) for s in range(6)] == [4, 4, 2, 2, 1, 1]
  assert [int(distill.student_steps(8, jnp.int32(s), 2)) for s in range(6)] == [4, 4, 2, 2, 1, 1]


def test_ordinary_runs_keep_the_train_state_layout_of_earlier_checkpoints():
  """Orbax restores by tree structure: a field added to TrainState would make every checkpoint
  written before it unreadable (the clean classifier runs the evaluations use, published imports).
  The teacher lives in the DistillState subclass, used only by distillation runs."""
  import dataclasses

  assert [f.name for f in dataclasses.fields(train.TrainState)] == ["step", "params", "ema_params", "opt_state"]
  assert [f.name for f in dataclasses.fields(train.DistillState)][-1] == "teacher_params"
  config = _tiny()
  exp = train.build_experiment(config)
  opt = train.make_optimizer(**config.optimizer.to_dict())
  mesh = sharding.create_mesh({"data": -1})
  _, plain, _ = train.abstract_train_state(config, exp, opt, mesh)
  assert type(plain) is train.TrainState
  config = _tiny(teacher="/t", teacher_steps=8, steps_per_round=2)
  _, student, _ = train.abstract_train_state(config, exp, opt, mesh)
  assert type(student) is train.DistillState
  # reflow keeps its teacher on fresh pairs, none on fixed ones (the step never runs it)
  reflow = load_config("mnist_distill", "tiny_reflow")
  reflow.distill.teacher = "/t"
  for pairs, kind in (("", train.DistillState), ("/p", train.TrainState)):
    reflow.distill.pairs = pairs
    assert type(train.abstract_train_state(reflow, train.build_experiment(reflow), opt, mesh)[1]) is kind
  # consistency distillation: the target network is kept only with a decay > 0
  config = load_config("mnist_distill", "tiny_consistency")
  config.distill.teacher = "/t"
  exp = train.build_experiment(config)
  for decay, kind in ((0.95, train.ConsistencyState), (0.0, train.DistillState)):
    config.distill.target_decay = decay
    _, student, _ = train.abstract_train_state(config, exp, opt, mesh)
    assert type(student) is kind
    step = train.make_train_step(config, exp, opt)
    batch = {"x": jnp.zeros((2, 28, 28, 1)), "label": jnp.zeros((2,), jnp.int32)}
    with pytest.raises(ConfigError, match=f"target_decay={decay}"):
      step(plain, batch, jax.random.key(0))
    after, _ = jax.eval_shape(step, student, batch, jax.random.key(0))  # traces the whole step
    assert jax.tree.structure(after) == jax.tree.structure(student)


# --------------------------------------------------------------------------------------
# Consistency distillation
# --------------------------------------------------------------------------------------

MU, SD = 0.3, 0.7  # 1-D Gaussian data, whose probability-flow ODE is solved in closed form


def _time_of(name, process, c):
  """The time a network input c = noise_cond(t) stands for."""
  if name == "edm":
    return jnp.exp(4.0 * c)
  if name == "ve":
    return process.t_from_log_snr(-2.0 * jnp.log(c))
  return c / 999.0  # vp, cosine_vp, rectified_flow (shift 1)


def _gaussian_nets(name, process):
  """x0-predicting nets for N(MU, SD^2) data: the exact denoiser E[x0 | x_t] (the teacher), and the
  net whose consistency function is the exact flow map to t_min: in y = x / alpha, n = sigma / alpha,
  the trajectories are y - MU = (y_t - MU) sqrt(SD^2 + n^2) / sqrt(SD^2 + n_t^2)."""
  n_min = float(process.sigma(process.t_min) / process.alpha(process.t_min))

  def y_n(x, c):
    t = _time_of(name, process, c)
    a, s = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
    return x / a, s / a, t

  def denoiser(x, c):
    y, n, _ = y_n(x, c)
    return MU + SD**2 / (SD**2 + n**2) * (y - MU)

  def flow_map(x, c):  # x0_hat with c_skip y + (1 - c_skip) x0_hat = the flow map (c_skip = 1 only at t_min)
    y, n, t = y_n(x, c)
    f = MU + jnp.sqrt(SD**2 + n_min**2) / jnp.sqrt(SD**2 + n**2) * (y - MU)
    cs = bcast(param_lib.consistency_skip(process, t), x)
    return jnp.where(cs < 1.0, (f - cs * y) / jnp.where(cs < 1.0, 1.0 - cs, 1.0), 0.0)

  return denoiser, flow_map


@pytest.mark.parametrize("pname", ["edm", "ve", "vp", "cosine_vp", "rectified_flow"])
def test_consistency_loss_vanishes_at_the_exact_flow_map(pname):
  """Exact teacher, student = the exact flow map: the loss is only the teacher step's error, 30x
  (measured 35x-790x) below the loss of the teacher's own denoiser as student, and Heun's second
  order makes it smaller than DDIM's; f(x, t_min) = x / alpha for any network output."""
  process = processes.get_process(pname)
  denoiser, flow_map = _gaussian_nets(pname, process)
  x0 = MU + SD * jax.random.normal(jax.random.key(0), (2048, 4))
  loss = {}
  for solver in losses.CONSISTENCY_SOLVERS:
    fn = losses.make_consistency_loss(process, prediction="x0", num_scales=18, solver=solver)
    loss[solver], aux = fn(flow_map, flow_map, denoiser, x0, jax.random.key(1))
    loss[solver + "_denoiser"], _ = fn(denoiser, denoiser, denoiser, x0, jax.random.key(1))
    assert bool(jnp.all(aux["t"] > aux["s"]))
  assert float(loss["heun"]) < float(loss["heun_denoiser"]) / 30, loss
  assert float(loss["heun"]) < float(loss["ddim"]), loss
  # the pseudo-Huber distance of the same draws: sqrt(||d||^2 + c^2) - c, c = 0.00054 sqrt(dim)
  per = {m: fn(denoiser, denoiser, denoiser, x0, jax.random.key(1))[1]["loss_per_example"] for m, fn in (
      ("l2_sum", losses.make_consistency_loss(process, prediction="x0", num_scales=18, reduce="sum")),
      ("huber", losses.make_consistency_loss(process, prediction="x0", num_scales=18, metric="pseudo_huber")))}
  c = 0.00054 * 2.0
  np.testing.assert_allclose(per["huber"], np.sqrt(per["l2_sum"] + c * c) - c, rtol=1e-4, atol=1e-7)

  x = jax.random.normal(jax.random.key(2), (3, 4))
  t_min = jnp.full((3,), process.t_min)
  np.testing.assert_allclose(param_lib.consistency_x0(process, 1e3 * x, x, t_min), x / process.alpha(t_min)[:, None],
                             rtol=1e-6)


def test_consistency_sampler_draws_the_data_in_one_jump_from_the_exact_flow_map():
  """With the exact flow map as the model, `consistency` draws N(MU, SD^2) in 1 and in 3 network
  evaluations (EDM and cosine-VP), and `consistency_score_fn`'s denoised estimate is the
  consistency function of the wrapped network's."""
  for name in ("edm", "cosine_vp"):
    process = processes.get_process(name)
    _, flow_map = _gaussian_nets(name, process)
    score = param_lib.consistency_score_fn(param_lib.score_fn_from_network(flow_map, process, "x0"), process)
    for n in (1, 3):
      x, info = samplers.sample(jax.random.key(n), process, score, (20000, 1), method="consistency", num_steps=n)
      assert info["nfe"] == n
      assert abs(float(jnp.mean(x)) - MU) < 0.02 and abs(float(jnp.std(x)) - SD) < 0.02, (name, n)
  process = processes.CosineVP()
  wrapped = param_lib.consistency_score_fn(_x0_from(lambda x, t: jnp.tanh(x), process), process, sigma_data=0.3)
  x, t = jax.random.normal(jax.random.key(3), (4, 2)), jnp.asarray([0.9, 0.5, 0.1, 0.01])
  x0 = samplers.x0_eps_from_score(process, wrapped(x, t), x, t)[0]
  np.testing.assert_allclose(x0, param_lib.consistency_x0(process, jnp.tanh(x), x, t, 0.3), rtol=1e-4, atol=1e-5)
  assert samplers.default_grid(process, "consistency", 2).shape == (2,)


def test_consistency_distilled_mlp_jumps_to_the_exact_teachers_ode_endpoints():
  """The exact mixture denoiser as teacher, a small MLP student trained for 600 steps (target EMA
  0.95): its 1-evaluation samples land over 10x nearer the teacher's 40-step Heun ODE endpoints
  from the same noise than the teacher's own one DDIM step (measured: 0.20 against 3.97), and far
  more likely under the data (the mixture's exact log-density: -9.5 against -86; the ODE's -1.1)."""
  process, gmm = processes.CosineVP(), synthetic.gmm2d()
  exact_v = _exact_mixture_v(process, gmm)

  sigma_data = float(np.std(gmm.sample(10000, seed=3)[0]))
  model = MLP(hidden=128, num_layers=2, time_dim=32)
  params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
  loss_fn = losses.make_consistency_loss(process, prediction="v", num_scales=18, sigma_data=sigma_data)
  steps = 600
  opt = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
  data = jnp.asarray(gmm.sample(steps * 256, seed=1)[0]).reshape(steps, 256, 2)

  @jax.jit
  def train_all(params):
    def body(carry, inp):
      params, target, opt_state = carry
      x0, i = inp
      def objective(p):
        return loss_fn(lambda x, c: model.apply({"params": p}, x, c),
                       lambda x, c: model.apply({"params": target}, x, c), exact_v, x0, jax.random.key(i))[0]
      loss, g = jax.value_and_grad(objective)(params)
      upd, opt_state = opt.update(g, opt_state, params)
      params = optax.apply_updates(params, upd)
      return (params, optax.incremental_update(params, target, 0.05), opt_state), loss
    (params, _, _), curve = jax.lax.scan(body, (params, params, opt.init(params)), (data, jnp.arange(steps)))
    return params, curve

  params, curve = train_all(params)
  assert float(jnp.mean(curve[-50:])) < 0.2 * float(curve[0]), (float(curve[0]), float(jnp.mean(curve[-50:])))

  def v_score(net):
    return param_lib.score_fn_from_network(net, process, "v")

  key, shape = jax.random.key(7), (2000, 2)
  ode, _ = samplers.sample(key, process, v_score(exact_v), shape, method="heun", num_steps=40)
  teacher1, _ = samplers.sample(key, process, v_score(exact_v), shape, method="ddim", num_steps=1)
  student = param_lib.consistency_score_fn(v_score(lambda x, c: model.apply({"params": params}, x, c)), process,
                                           sigma_data)
  student1, info = samplers.sample(key, process, student, shape, method="consistency", num_steps=1)
  assert info["nfe"] == 1
  err = lambda x: float(jnp.mean(jnp.sum((x - ode) ** 2, -1)))  # noqa: E731
  logp = lambda x: float(jnp.mean(gmm.log_prob(x)))  # noqa: E731
  assert err(student1) < 0.1 * err(teacher1), (err(student1), err(teacher1))
  assert logp(student1) > logp(teacher1) + 40.0, (logp(student1), logp(teacher1), logp(ode))


def test_consistency_run_keeps_its_teacher_moves_its_target_resumes_and_samples_in_one_step(
    tfds_dir, tiny_teacher, tmp_path):
  """configs/mnist_distill.py:tiny_consistency from :tiny_teacher (class-conditional, 4 updates):
  the teacher stays the teacher run's EMA, the target moves towards the student at 1 - 0.95, a
  resume from the checkpoint before the last is the same run, run_sample.py's sampler takes one
  network evaluation (with guidance), and the run has no likelihood."""
  teacher_config, teacher_dir = tiny_teacher
  student_dir = str(tmp_path / "student")
  config = load_config("mnist_distill", "tiny_consistency")
  config.data.data_dir, config.distill.teacher = tfds_dir, teacher_dir
  config.training.update(num_final_samples=0, checkpoint_every=1)  # keeps steps 3 and 4; sampled below
  out = train.train_and_evaluate(config, student_dir)
  assert np.isfinite(out["loss"]) and out["loss"] > 0
  teacher = _state(teacher_dir, teacher_config, 4)
  s3, s4 = _state(student_dir, config, 3), _state(student_dir, config, 4)
  assert type(s4) is train.ConsistencyState
  _assert_trees_equal(s4.teacher_params, teacher.ema_params)  # fixed for the whole run
  flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])  # noqa: E731
  target, student, start = flat(s3.target_params), flat(s3.params), flat(teacher.ema_params)
  assert 0 < np.abs(target - start).max() < np.abs(student - start).max()  # between the two
  # each update moves the target 5% of the way to the updated student
  np.testing.assert_allclose(flat(s4.target_params), 0.95 * target + 0.05 * flat(s4.params), rtol=1e-5, atol=1e-7)

  resumed, loaded = _resumes_and_samples_in_one_step(config, student_dir, s4, tmp_path)
  # a consistency model is no teacher
  again = load_config("mnist_distill", "tiny_consistency")
  again.distill.teacher = resumed
  with pytest.raises(ConfigError, match="consistency model"):
    distill.check_teacher(again, loaded)


def _config_error(name, variant, **overrides):
  """The ConfigError that validating configs/<name>.py:<variant> raises with `section__key=value`
  overrides (applied in order)."""
  from jaxdiff import configs as config_lib

  c = load_config(name, variant)
  for key, value in overrides.items():
    section, field = key.split("__")
    c[section][field] = value
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  return str(e.value)


def _resumes_and_samples_in_one_step(config, workdir, s4, tmp_path):
  """A consistency model's 4-update run: resumed from step 3 it reaches `s4` again; run_sample's
  sampler takes one network evaluation (with guidance); it has no likelihood. Returns the
  resumed run's (workdir, loaded config)."""
  from jaxdiff import evaluate, generate
  from jaxdiff.errors import InputError

  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  train.train_and_evaluate(config, resumed)
  for x, y in zip(jax.tree.leaves(_state(resumed, config, 4)), jax.tree.leaves(s4), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  loaded = generate.load_config(resumed)
  loaded.sampling.guidance_scale = 2.0
  result = generate.generate(loaded, resumed, num_samples=8, out_dir=str(tmp_path / "g"), labels=[3] * 8)
  assert result["nfe"] == 1 and result["method"] == "consistency"
  with pytest.raises(InputError, match="consistency model"):
    evaluate.make_likelihood_fn(train.build_experiment(loaded))
  return resumed, loaded


def test_consistency_config_errors_name_the_key_and_the_fix():
  from jaxdiff import configs as config_lib

  def err(**kw):
    return _config_error("mnist_distill", "tiny_consistency", distill__teacher="/nowhere", **kw)

  c = load_config("mnist_distill", "tiny_consistency")
  c.distill.teacher = "/nowhere"
  config_lib.validate(c)
  assert "config.distill.method='rounds'" in err(distill__method="rounds")
  assert "config.distill.teacher_steps=8" in err(distill__teacher_steps=8)
  assert "config.distill.solver='euler'" in err(distill__solver="euler")
  assert "config.distill.metric='lpips'" in err(distill__metric="lpips")
  assert "num_scales=1" in err(distill__num_scales=1)
  assert "target_decay=1.0" in err(distill__target_decay=1.0)
  assert "sigma_data=0.0" in err(distill__sigma_data=0.0)
  assert "--config.sampling.method=consistency" in err(sampling__method="ddim")
  no_teacher = train.create_train_state(jax.random.key(0), model=MLP(), optimizer=optax.adam(1e-3),
                                        example_x=jnp.zeros((1, 2)), target=True)  # consistency training's
  assert type(no_teacher) is train.TargetState


# --------------------------------------------------------------------------------------
# Reflow
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pname", ["rectified_flow", "cosine_vp"])
def test_reflow_loss_vanishes_at_the_student_of_the_teachers_own_coupling(pname):
  """Exact teacher for N(MU, SD^2) data: its ODE maps x_T = prior_std eps to x0 = a eps + b
  (closed form). The student that knows this coupling predicts x0 = a eps + b from x_t = alpha x0
  + sigma eps', eps' = (x_T - alpha_T x0) / sigma_T (both affine in eps); its reflow loss is only
  the teacher sampler's error, 100x below the teacher's own (whose x0_hat averages over
  independent noise), so the loss pairs each sample with the noise it came from; and one DDIM
  step of that student from x_T is the teacher's many-step sample."""
  process = processes.get_process(pname)
  denoiser, _ = _gaussian_nets(pname, process)
  t_T = jnp.asarray([process.T])
  n_T = float(process.sigma(t_T)[0] / process.alpha(t_T)[0])
  n_min = float(process.sigma(process.t_min) / process.alpha(process.t_min))
  shrink = np.sqrt(SD**2 + n_min**2) / np.sqrt(SD**2 + n_T**2)
  a, b = shrink * process.prior_std / float(process.alpha(t_T)[0]), MU * (1.0 - shrink)

  a_T, s_T, p = float(process.alpha(t_T)[0]), float(process.sigma(t_T)[0]), process.prior_std

  def straight(x, c):  # x = A eps + B along the coupled path
    t = _time_of(pname, process, c)
    al, sg = bcast(process.alpha(t), x), bcast(process.sigma(t), x)
    big_a = al * a + sg * (p - a_T * a) / s_T
    big_b = al * b - sg * a_T * b / s_T
    return a * (x - big_b) / big_a + b

  x0 = jnp.zeros((2048, 3))  # reflow reads only the batch's shape
  fn = losses.make_reflow_loss(process, prediction="x0", solver="heun", num_steps=24)
  mine, _ = fn(straight, denoiser, x0, jax.random.key(0))
  theirs, _ = fn(denoiser, denoiser, x0, jax.random.key(0))
  assert float(mine) < float(theirs) / 100, (float(mine), float(theirs))
  # a fixed pair (noise, the teacher's sample of it) gives the loss of the same pair drawn afresh
  couple = losses.make_reflow_coupling(process, prediction="x0", solver="heun", num_steps=24)
  k_eps = jax.random.split(jax.random.key(0))[0]
  x_T = process.prior_std * jax.random.normal(k_eps, x0.shape)
  fixed, _ = fn(straight, None, couple(denoiser, x_T, k_eps), jax.random.key(0), noise=x_T)
  assert float(fixed) == pytest.approx(float(mine), rel=1e-6)

  eps = jax.random.normal(jax.random.key(1), (512, 3))
  score = param_lib.score_fn_from_network(straight, process, "x0")
  one, info = samplers.sample(jax.random.key(2), process, score, eps.shape, method="ddim", num_steps=1,
                              x_init=process.prior_std * eps)
  assert info["nfe"] == 1
  np.testing.assert_allclose(one, a * eps + b, rtol=1e-3, atol=1e-3)


def test_reflow_run_samples_from_the_fixed_teacher_and_its_errors(tfds_dir, tiny_teacher, tmp_path):
  """configs/mnist_distill.py:tiny_reflow from :tiny_teacher: the teacher stays the teacher run's
  EMA, the student moves, run_sample draws in the configured 1 DDIM step, the student run is
  the next reflow's teacher; bad settings are refused naming the key."""
  from jaxdiff import configs as config_lib
  from jaxdiff import generate

  teacher_config, teacher_dir = tiny_teacher
  config = load_config("mnist_distill", "tiny_reflow")
  config.data.data_dir, config.distill.teacher = tfds_dir, teacher_dir
  config.training.num_final_samples = 0
  out = train.train_and_evaluate(config, str(tmp_path / "student"))
  assert np.isfinite(out["loss"]) and out["loss"] > 0
  s4, teacher = _state(str(tmp_path / "student"), config, 4), _state(teacher_dir, teacher_config, 4)
  assert type(s4) is train.DistillState
  _assert_trees_equal(s4.teacher_params, teacher.ema_params)
  assert not np.array_equal(jax.tree.leaves(s4.params)[0], jax.tree.leaves(teacher.ema_params)[0])
  result = generate.generate(generate.load_config(str(tmp_path / "student")), str(tmp_path / "student"),
                             num_samples=8, out_dir=str(tmp_path / "s"))
  assert result["nfe"] == 1 and result["method"] == "ddim"

  # Iterated reflow (2-rectified flow): the student run is the next run's teacher, and what that
  # run loads is the student's EMA, not the teacher the student kept in its state.
  again = load_config("mnist_distill", "tiny_reflow")
  again.distill.teacher = str(tmp_path / "student")
  mesh = sharding.create_mesh(again.mesh.to_dict())
  opt = train.make_optimizer(**again.optimizer.to_dict(), num_steps=again.training.num_steps)
  abstract = train.abstract_train_state(again, train.build_experiment(again), opt, mesh)[1]
  step, params = distill.load_teacher(again, mesh, abstract.params)
  assert step == 4
  _assert_trees_equal(jax.device_get(params), s4.ema_params)

  for key, value, match in (("solver", "euler", "config.distill.solver='euler'"),
                            ("teacher_steps", 0, "--config.distill.teacher_steps=8"),
                            ("steps_per_round", 2, "config.distill.steps_per_round=2")):
    c = load_config("mnist_distill", "tiny_reflow")
    c.distill.teacher = "/nowhere"
    c.distill[key] = value
    with pytest.raises(ConfigError, match=match):
      config_lib.validate(c)


def test_reflow_on_fixed_pairs_made_once_by_the_teacher(tfds_dir, tiny_teacher, tmp_path, monkeypatch):
  """config.distill.pairs: the run first makes num_pairs pairs with the teacher (each x the
  teacher's Heun sample of its noise, for its label), continuing after the batches written if it
  was stopped, trains on them without running the teacher, and a resumed run reuses them; pairs
  made otherwise are refused naming the key."""
  from jaxdiff import configs as config_lib
  from jaxdiff.data import pairs as pairs_lib

  teacher_config, teacher_dir = tiny_teacher
  config = load_config("mnist_distill", "tiny_reflow")
  config.data.data_dir, config.distill.teacher = tfds_dir, teacher_dir
  config.distill.update(pairs=str(tmp_path / "pairs"), num_pairs=20)  # 3 batches of 8, the last cut
  config.training.update(num_final_samples=0, label_dropout=0.5)

  class Preempted(Exception):
    pass

  real_add, written = pairs_lib.PairsWriter.add, []

  def add(writer, chunk):  # the first run is stopped after its first batch of pairs
    real_add(writer, chunk)
    written.append(writer.filled)
    if len(written) == 1:
      raise Preempted

  monkeypatch.setattr(pairs_lib.PairsWriter, "add", add)
  real_load, loads = distill.load_teacher, []
  monkeypatch.setattr(distill, "load_teacher", lambda *a, **k: loads.append(1) or real_load(*a, **k))
  with pytest.raises(Preempted):
    train.train_and_evaluate(config, str(tmp_path / "student"))
  assert (tmp_path / "pairs.partial").is_dir() and not (tmp_path / "pairs").exists()
  out = train.train_and_evaluate(config, str(tmp_path / "student"))
  assert written == [8, 16, 20]  # the second run made batches 1 and 2
  assert len(loads) == 2  # once a run: the student starts from the teacher that made the pairs
  assert np.isfinite(out["loss"]) and out["loss"] > 0
  pairs = {n: np.load(tmp_path / "pairs" / f"{n}.npy") for n in ("noise", "x", "label")}
  meta = json.loads((tmp_path / "pairs" / "pairs.json").read_text())
  assert meta["num_pairs"] == 20 and meta["teacher"] == teacher_dir and meta["label_dropout"] == 0.5
  assert meta["resumed_from"] == 8 and not (tmp_path / "pairs.partial").exists()
  assert pairs["x"].shape == pairs["noise"].shape == (20, 28, 28, 1) and pairs["label"].shape == (20,)
  assert set(pairs["label"]) <= set(range(11)) and (pairs["label"] == 10).any()  # 10: dropped to the null label
  # the first batch again, from the teacher run's EMA parameters
  exp = train.build_experiment(config)
  teacher = _state(teacher_dir, teacher_config, 4).ema_params
  couple = losses.make_reflow_coupling(exp.process, prediction=config.loss.prediction, solver="heun",
                                       num_steps=int(config.distill.teacher_steps), clip=exp.data_range)
  sample = jax.jit(lambda noise, y: couple(train.network_fn(exp.model, teacher, y=y), noise, jax.random.key(0)))
  for rows in (slice(0, 8), slice(8, 16)):  # the first run's batch and the second's
    x = sample(pairs["noise"][rows], pairs["label"][rows])
    np.testing.assert_allclose(np.asarray(x), pairs["x"][rows], atol=1e-3)  # 8 devices or 1: float sums differ
  assert np.abs(pairs["noise"][:8] - pairs["noise"][8:16]).min() > 0  # batch 1's key, not batch 0's again
  assert abs(float(np.std(pairs["noise"])) - exp.process.prior_std) < 0.05

  # the step on a batch of pairs never runs the teacher, so the run keeps none: a plain TrainState
  state = _state(str(tmp_path / "student"), config, 4)
  assert type(state) is train.TrainState
  step = train.make_train_step(config, exp, train.make_optimizer(**config.optimizer.to_dict(), num_steps=4))
  batch = {"x": pairs["x"][:8], "noise": pairs["noise"][:8], "label": pairs["label"][:8]}
  after, _ = jax.eval_shape(step, state, batch, jax.random.key(3))
  assert jax.tree.structure(after) == jax.tree.structure(state)
  with pytest.raises(ConfigError, match="on fresh pairs needs a DistillState"):  # a batch without noise
    step(state, {"x": batch["x"], "label": batch["label"]}, jax.random.key(3))

  mtime = os.path.getmtime(tmp_path / "pairs" / "x.npy")
  config.training.num_steps = 6  # resumes at 4 on the same pairs
  train.train_and_evaluate(config, str(tmp_path / "student"))
  assert os.path.getmtime(tmp_path / "pairs" / "x.npy") == mtime
  for key, value, match in (("num_pairs", 32, "holds 20 pairs"), ("solver", "ddim", "solver='heun'"),
                            ("teacher", teacher_dir + "@2", f"made from step 4 of {teacher_dir}, but")):
    c = config.copy_and_resolve_references()
    c.distill[key] = value
    with pytest.raises(ConfigError, match=match):
      train.train_and_evaluate(c, str(tmp_path / f"other_{key}"))
  for key, value, match in (("num_pairs", 4, "num_pairs=4 must be >= config.training.batch_size=8"),
                            ("pairs", "", "num_pairs=20 is the size of a fixed set"),
                            ("pairs_dtype", "bfloat16", "pairs_dtype='bfloat16' is not known; use one of float32"),
                            ("pairs", "gs://b/p", "memory-mapped files, so they need a filesystem path")):
    c = config.copy_and_resolve_references()
    c.distill[key] = value
    with pytest.raises(ConfigError, match=match):
      config_lib.validate(c)
  # every host reads the pairs process 0 wrote: one that does not see them is told where to put them
  train.check_pairs_visible(str(tmp_path / "pairs"))
  with pytest.raises(DataError, match="process 0 of 1 does not see the pairs process 0 wrote"):
    train.check_pairs_visible(str(tmp_path / "host_local"))


# --------------------------------------------------------------------------------------
# Consistency training (no teacher)
# --------------------------------------------------------------------------------------


def test_consistency_training_gradient_is_distillations_from_the_exact_teacher():
  """Song et al.'s Theorem 2, exactly: for a model linear in x and Gaussian data, E[z_s | z_t] with
  the same noise at both times is the DDIM step of the exact denoiser, so consistency training's
  gradient equals consistency distillation's with that teacher (same draws: measured to 1e-4
  on the slope, within sampling noise on the offset). A target at the wrong time or with its own
  noise is off by far more."""
  for name in ("edm", "cosine_vp", "ve"):
    process = processes.get_process(name)
    denoiser, _ = _gaussian_nets(name, process)

    def linear(p, name=name, process=process):
      def net(x, c):
        return p["a"] * x / bcast(process.alpha(_time_of(name, process, c)), x) + p["b"]
      return net

    p0 = {"a": jnp.float32(0.5), "b": jnp.float32(0.1)}
    x0 = MU + SD * jax.random.normal(jax.random.key(0), (200_000, 1))
    ct = losses.make_consistency_training_loss(process, prediction="x0", num_steps=1, scales=(17, 17), metric="l2",
                                               weighting="none", t_sampling="process", sigma_data=SD)
    cd = losses.make_consistency_loss(process, prediction="x0", num_scales=18, solver="ddim", sigma_data=SD)
    g_ct = jax.grad(lambda p: ct(linear(p), linear(p), x0, jax.random.key(1), 0)[0])(p0)
    g_cd = jax.grad(lambda p: cd(linear(p), linear(p), denoiser, x0, jax.random.key(1))[0])(p0)
    assert abs(float(g_ct["a"]) / float(g_cd["a"]) - 1) < 2e-3, (name, g_ct, g_cd)
    assert 0.7 < float(g_ct["b"]) / float(g_cd["b"]) < 1.3, (name, g_ct, g_cd)


def test_consistency_training_curriculum_interval_draws_and_weights():
  """Song & Dhariwal's curriculum N(k) = min(s0 2^floor(k / K'), s1); the grid of N intervals is the
  distillation grid of N + 1 times; 'lognormal' draws interval n with the erf formula's
  probability (empirical, 100k draws); 'inverse_gap' divides by the interval's noise gap; the
  pseudo-Huber distance is its formula; a short grid draws only its own intervals."""
  def ict(k, total, s0, s1):  # the paper's formula, written out
    k_stage = math.floor(total / (math.floor(math.log2(s1 / s0)) + 1))
    return min(s0 * 2 ** math.floor(k / k_stage), s1)

  for k in (0, 99, 100, 250, 699, 700, 799):
    assert losses.consistency_training_scales(k, 800, (10, 1280)) == ict(k, 800, 10, 1280)
    assert int(losses.consistency_training_scales(jnp.int32(k), 800, (10, 1280))) == ict(k, 800, 10, 1280)
  assert losses.consistency_training_scales(5, 6, (4, 4)) == 4
  process = processes.EDM()
  traced = jax.jit(lambda n: samplers.karras_grid_points(process, jnp.arange(18), n)[0])  # N traced, as in training
  np.testing.assert_allclose(traced(jnp.int32(17)), losses.consistency_grid(process, 18), rtol=1e-6)

  x0 = 0.5 * jax.random.normal(jax.random.key(0), (100_000, 3))
  net = lambda x, c: jnp.zeros_like(x)  # noqa: E731  (x0_hat = 0)
  n_int, pm, ps = 16, -1.1, 2.0
  kw = dict(num_steps=1, scales=(n_int, n_int), t_sampling="lognormal", p_mean=pm, p_std=ps, prediction="x0")
  per = {}
  for w, metric, reduce in (("none", "l2", "sum"), ("inverse_gap", "l2", "sum"), ("none", "pseudo_huber", "mean")):
    fn = losses.make_consistency_training_loss(process, weighting=w, metric=metric, reduce=reduce, **kw)
    _, aux = fn(net, net, x0, jax.random.key(1), 0)
    per[w, metric] = np.asarray(aux["loss_per_example"])
  t, s = np.asarray(aux["t"]), np.asarray(aux["s"])  # EDM: the noise levels themselves
  grid = np.asarray(losses.consistency_grid(process, n_int + 1), np.float64)
  n = np.searchsorted(-grid, -t)
  np.testing.assert_allclose(grid[n], t, rtol=1e-6)
  np.testing.assert_allclose(grid[n + 1], s, rtol=1e-6)
  import scipy.special

  cdf = scipy.special.erf((np.log(grid) - pm) / (np.sqrt(2.0) * ps))
  want = (cdf[:-1] - cdf[1:]) / (cdf[0] - cdf[-1])
  np.testing.assert_allclose(np.bincount(n, minlength=n_int) / n.size, want, atol=4e-3)
  np.testing.assert_allclose(per["inverse_gap", "l2"] * (t - s), per["none", "l2"], rtol=1e-5)
  c = 0.00054 * np.sqrt(3.0)
  np.testing.assert_allclose(per["none", "pseudo_huber"], np.sqrt(per["none", "l2"] + c * c) - c, rtol=1e-4)

  fn = losses.make_consistency_training_loss(process, num_steps=8, scales=(2, 8), t_sampling="process",
                                             prediction="x0")
  _, aux = fn(net, net, x0[:512], jax.random.key(2), jnp.int32(0))  # stage 0: 2 intervals, 3 times
  assert float(aux["num_scales"]) == 2
  np.testing.assert_allclose(np.unique(np.asarray(aux["t"])), np.sort(losses.consistency_grid(process, 3))[1:],
                             rtol=1e-6)


def test_consistency_trained_mlp_draws_the_mixture_in_one_step():
  """From data alone, no teacher: a small MLP trained with the iCT loss for 800 steps of 128 (intervals
  10 -> 160) draws the 8-mode mixture in one network evaluation: mean exact log-density -5.9
  (measured; the data's own -1.2, the initial network's -85, the exact teacher's one DDIM step
  -86, consistency distillation from the exact teacher -9.5), every mode drawn."""
  process, gmm = processes.CosineVP(), synthetic.gmm2d()
  sigma_data = float(np.std(gmm.sample(10000, seed=3)[0]))
  model = MLP(hidden=128, num_layers=2, time_dim=32)
  init = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
  steps = 800
  loss_fn = losses.make_consistency_training_loss(process, prediction="v", num_steps=steps, scales=(10, 160),
                                                  sigma_data=sigma_data)
  opt = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
  data = jnp.asarray(gmm.sample(steps * 128, seed=1)[0]).reshape(steps, 128, 2)

  @jax.jit
  def train_all(params):
    def body(carry, inp):
      params, opt_state = carry
      x0, i = inp

      def objective(p):
        net = lambda x, c: model.apply({"params": p}, x, c)  # noqa: E731  (the target: the same, no gradient)
        return loss_fn(net, net, x0, jax.random.key(i), i)[0]
      g = jax.grad(objective)(params)
      upd, opt_state = opt.update(g, opt_state, params)
      return (optax.apply_updates(params, upd), opt_state), None
    return jax.lax.scan(body, (params, opt.init(params)), (data, jnp.arange(steps)))[0][0]

  params = train_all(init)

  def draw(p, n):
    score = param_lib.score_fn_from_network(lambda x, c: model.apply({"params": p}, x, c), process, "v")
    score = param_lib.consistency_score_fn(score, process, sigma_data)
    x, info = samplers.sample(jax.random.key(7), process, score, (2000, 2), method="consistency", num_steps=n)
    assert info["nfe"] == n
    return x, float(jnp.mean(gmm.log_prob(x)))

  x1, logp1 = draw(params, 1)
  _, logp_init = draw(init, 1)
  assert logp1 > -12.0 and logp_init < -50.0, (logp1, logp_init)
  nearest = jnp.argmin(jnp.sum((x1[:, None] - jnp.asarray(gmm.means, jnp.float32)[None]) ** 2, -1), -1)
  assert np.bincount(np.asarray(nearest), minlength=8).min() > 150  # no mode dropped


def test_consistency_training_run_target_dropout_resume_sampling_and_errors(tfds_dir, tmp_path):
  """configs/mnist_ct.py:tiny (class-conditional, dropout 0.1, intervals 2 -> 8 in 4 updates) with a
  target EMA of 0.5: the logged grid sizes, the target's EMA formula between checkpoints, an
  exact resume, one-evaluation sampling with guidance, no likelihood, no use as a teacher; the
  target sees the student's dropout mask; the train state without a target; the config errors."""
  from jaxdiff import configs as config_lib

  config = load_config("mnist_ct", "tiny")
  config.data.data_dir = tfds_dir
  config.loss.target_decay = 0.5
  config.training.update(num_final_samples=0, checkpoint_every=1)
  workdir = str(tmp_path / "ct")
  out = train.train_and_evaluate(config, workdir)
  assert np.isfinite(out["loss"]) and out["loss"] > 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["num_scales"] for line in f] == [2.0, 4.0, 8.0, 8.0]  # doubling each update to s1
  s3, s4 = _state(workdir, config, 3), _state(workdir, config, 4)
  assert type(s4) is train.TargetState
  flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])  # noqa: E731
  np.testing.assert_allclose(flat(s4.target_params), 0.5 * flat(s3.target_params) + 0.5 * flat(s4.params),
                             rtol=1e-5, atol=1e-7)
  resumed, loaded = _resumes_and_samples_in_one_step(config, workdir, s4, tmp_path)
  exp = train.build_experiment(loaded)
  assert exp.consistency_sigma_data == 0.5
  student = load_config("mnist_distill", "tiny_consistency")
  student.distill.teacher = resumed
  with pytest.raises(ConfigError, match="consistency model"):
    distill.check_teacher(student, loaded)

  # the target network sees the student's dropout mask: with the student's own parameters (decay 0)
  # at the same input, the two outputs are equal, and dropout is on (they differ from eval mode)
  opt = train.make_optimizer(**config.optimizer.to_dict())
  config.loss.target_decay = 0.0
  _, abstract, _ = train.abstract_train_state(config, exp, opt, sharding.create_mesh({"data": -1}))
  assert type(abstract) is train.TrainState
  state = train.TrainState(step=s4.step, params=s4.params, ema_params=s4.ema_params,  # trained: the
                           opt_state=s4.opt_state)                                 # last conv is not 0
  batch = {"x": jax.random.normal(jax.random.key(1), (4, 28, 28, 1)), "label": jnp.arange(4)}
  eval_mode = train.network_fn(exp.model, state.params, y=batch["label"])

  def same_input(net, target, x0, key, step):  # reports the dropout effect where num_scales goes
    c = jnp.full((x0.shape[0],), 500.0)
    gap = jnp.sum((net(x0, c) - jax.lax.stop_gradient(target(x0, c))) ** 2)
    return gap, {"num_scales": jnp.sum((net(x0, c) - eval_mode(x0, c)) ** 2)}

  step = jax.jit(functools.partial(train.consistency_training_step, model=exp.model, loss_fn=same_input,
                                   optimizer=opt, ema_decay=0.9, label_dropout=0.0))
  _, metrics = step(state, batch, jax.random.key(2))
  assert float(metrics["loss"]) == 0.0 and float(metrics["num_scales"]) > 1e-6  # 8e-5 after 4 updates

  def err(**kw):
    return _config_error("mnist_ct", "tiny", **kw)

  for variant in (None, "runlocal", "finetune", "runlocal_finetune"):  # the full and CPU configs are valid
    config_lib.validate(load_config("mnist_ct", variant) if variant else load_config("mnist_ct"))
  assert "config.loss.objective='flow'" in err(loss__objective="flow")
  assert "--config.sampling.method=consistency" in err(sampling__method="ddim")
  assert "--config.distill.teacher=''" in err(distill__teacher="/somewhere")
  assert "target_decay=1.0" in err(loss__target_decay=1.0)
  assert "config.loss.scales=(0, 8)" in err(loss__scales=(0, 8))
  assert "config.loss.t_sampling='logit_normal'" in err(loss__t_sampling="logit_normal")
  assert "config.loss.weighting='edm'" in err(loss__weighting="edm")
  assert "config.loss.metric='lpips'" in err(loss__metric="lpips")
  assert "DDPM" in err(process__name="ddpm")


def test_a_run_starts_from_another_runs_ema_weights(tfds_dir, tiny_teacher, tmp_path):
  """config.training.init_from='jaxdiff:<workdir>' (here importing with num_steps=0): the step-0
  state is that run's EMA parameters; a different network or parameterization, a consistency
  model for a diffusion run, and a workdir without a run are errors naming the key."""
  from jaxdiff import configs as config_lib
  from jaxdiff.errors import CheckpointError
  from jaxdiff.models import pretrained

  teacher_config, teacher_dir = tiny_teacher
  config = load_config("mnist_ct", "tiny")  # the teacher's network with dropout 0.1: consistency training from it
  config.data.data_dir = tfds_dir
  config.training.update(init_from="jaxdiff:" + teacher_dir, num_steps=0, num_final_samples=0)
  workdir = str(tmp_path / "ft")
  train.train_and_evaluate(config, workdir)
  _assert_trees_equal(_state(workdir, config, 0).params, _state(teacher_dir, teacher_config, 4).ema_params)
  config.training.init_from = f"jaxdiff:{teacher_dir}@2"  # an earlier checkpoint of that run
  train.train_and_evaluate(config, str(tmp_path / "ft2"))
  step2 = _state(teacher_dir, teacher_config, 2).ema_params
  _assert_trees_equal(_state(str(tmp_path / "ft2"), config, 0).params, step2)
  assert not np.array_equal(jax.tree.leaves(step2)[-1], jax.tree.leaves(_state(workdir, config, 0).params)[-1])

  def err(exc=ConfigError, **kw):
    c = load_config("mnist_ct", "tiny")
    c.data.data_dir = tfds_dir
    c.training.update(init_from="jaxdiff:" + teacher_dir, num_steps=0, num_final_samples=0)
    for key, value in kw.items():
      section, name = key.split("__")
      c[section][name] = value
    with pytest.raises(exc) as e:
      train.train_and_evaluate(c, str(tmp_path / f"bad_{'_'.join(kw)}"))
    return str(e.value)

  assert "model.ch: 16 here, 8 there" in err(model__ch=16)
  assert "loss.prediction: 'eps' here, 'v' there" in err(loss__prediction="eps")
  assert "nowhere" in err(CheckpointError, training__init_from="jaxdiff:" + str(tmp_path / "nowhere"))
  e3 = err(CheckpointError, training__init_from=f"jaxdiff:{teacher_dir}@3")
  assert f"init_from='jaxdiff:{teacher_dir}@3'" in e3 and "step=3 does not exist" in e3 and "[2, 4]" in e3
  split = evaluate.split_run  # config.distill.teacher reads its run the same way
  assert split("runs/t@2000") == ("runs/t", 2000) and split("runs/t") == ("runs/t", None)
  assert split("/u@host/t") == ("/u@host/t", None) and split("@5") == ("@5", None)
  with pytest.raises(ConfigError, match="holds a consistency model"):
    pretrained.check_jaxdiff_run("jaxdiff:/ct", teacher_config, config, False, True)
  bad = load_config("mnist_ct", "tiny")
  bad.training.init_from = "jaxdiff"
  with pytest.raises(ConfigError, match=r"'jaxdiff:<run workdir>\[@<step>\]'"):
    config_lib.validate(bad)

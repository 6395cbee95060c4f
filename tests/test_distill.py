"""Progressive distillation: the target against the sampler, learning on the exact mixture teacher,
rounds and resume through run_train's loop, and the config errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import load_config
from jaxdiff import distill, losses, processes, samplers, sharding, train
from jaxdiff import checkpoint as ckpt_lib
from jaxdiff.data import synthetic
from jaxdiff.errors import ConfigError
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


@pytest.mark.parametrize("pname", sorted(CONTINUOUS))
def test_one_student_step_to_the_target_lands_where_two_teacher_steps_do(pname):
  """With x0 = distillation_target, the sampler's own DDIM step from z_t reaches the teacher's
  z_t'' (two DDIM steps of the sampler through the midpoint), for the first, a middle and
  the last interval of the grid."""
  process = CONTINUOUS[pname]
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


def test_distilled_mlp_takes_in_one_step_what_the_exact_teacher_takes_in_two():
  """The exact mixture denoiser as teacher (2 DDIM steps), a small MLP student trained for 1 step:
  its 1-step samples are 100x nearer the teacher's 2-step ones, from the same noise, than the
  teacher's own 1-step samples are (measured: 7e-5 against 1.9), and as likely under the data
  (the mixture's exact log-density; 2 DDIM steps are far from the data: -15 against -86 for 1)."""
  process = processes.CosineVP()
  gmm = synthetic.gmm2d()

  def exact_v(x, c):  # the teacher, in the v-parameterization (network input: c = 999 t)
    t = c / 999.0
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    eps = -s * gmm.score(x, process.alpha(t), process.sigma(t))
    x0 = (x - s * eps) / a
    return a * eps - s * x0

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


def test_rounds_hand_the_student_over_and_a_resumed_run_matches(tfds_dir, tmp_path):
  """configs/mnist_distill.py:tiny_teacher, then :tiny (class-conditional, 8 -> 4 -> 2 steps in two
  rounds of 2 updates): each round's teacher, the metrics, a resume across the round's end (in
  calls of 2 steps) and the 2-evaluation sampler of run_sample.py."""
  from jaxdiff import generate

  teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
  teacher_config = load_config("mnist_distill", "tiny_teacher")
  teacher_config.data.data_dir = tfds_dir
  train.train_and_evaluate(teacher_config, teacher_dir)
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


def test_config_errors_name_the_key_and_the_fix(tmp_path):
  from jaxdiff import configs as config_lib

  def err(config):
    with pytest.raises(ConfigError) as e:
      config_lib.validate(config)
    return str(e.value)

  ok = _tiny(teacher="/nowhere", teacher_steps=8, steps_per_round=2)
  config_lib.validate(ok)  # numbers only: the teacher run is read when training starts
  c = _tiny(teacher="/nowhere", teacher_steps=8, steps_per_round=2)
  c.process = ml_collections.ConfigDict(dict(name="ddpm", num_timesteps=100))
  assert "DDPM" in err(c) and "cosine_vp" in err(c)
  c = _tiny(teacher="/nowhere", teacher_steps=8, steps_per_round=2)
  c.process = ml_collections.ConfigDict(dict(name="edm"))
  c.loss.prediction = "x0"
  assert "EDM" in err(c)
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

"""The train step and the training loop: learning, devices, checkpoints, resume, NaN guard."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from jaxdiff import checkpoint as ckpt_lib
from jaxdiff import data as data_lib
from jaxdiff import generate, sharding, train
from jaxdiff.errors import CheckpointError, ConfigError, NonFiniteLossError


def tiny(**sections):
  c = load_config("tiny")
  for section, values in sections.items():
    c[section].update(values)
  return c


def build(c, devices):
  exp = train.build_experiment(c)
  opt = train.make_optimizer(**c.optimizer.to_dict(), num_steps=c.training.num_steps)
  mesh = sharding.create_mesh({"data": len(devices)}, devices=devices)
  init, _, state_sh = train.abstract_train_state(c, exp, opt, mesh)
  step = jax.jit(functools.partial(train.train_step, model=exp.model, loss_fn=train.make_loss(c, exp.process),
                                   optimizer=opt, ema_decay=c.training.ema_decay),
                 in_shardings=(state_sh, {"x": sharding.batch_sharding(mesh, 4)}, sharding.replicated(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)))
  return exp, init, state_sh, step, mesh


def fixed_batch(c, n=8):
  it = data_lib.create_dataset(dataset="shapes", batch_size=n, resolution=c.data.resolution,
                               num_channels=3, num_examples=64, num_threads=1)
  return {"x": jnp.asarray(next(it)["x"])}


def test_training_decreases_loss_on_a_fixed_batch():
  c = tiny(optimizer=dict(learning_rate=3e-3, warmup_steps=0))
  _, init, state_sh, step, _ = build(c, jax.devices()[:1])
  state = jax.jit(init, out_shardings=state_sh)(jax.random.key(0))
  batch, key = fixed_batch(c), jax.random.key(1)
  _, m0 = step(state, batch, key)
  for _ in range(15):
    state, m = step(state, batch, key)
  assert float(m["loss"]) < 0.7 * float(m0["loss"])
  assert int(state.step) == 15
  # EMA moved towards the params but is not equal to them
  d = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), state.params, state.ema_params))
  assert 0 < max(float(x) for x in d)


def test_one_and_eight_devices_give_the_same_step():
  assert len(jax.devices()) == 8
  c = tiny()
  _, init, _, step1, mesh1 = build(c, jax.devices()[:1])
  _, _, state_sh8, step8, _ = build(c, jax.devices())
  state = jax.jit(init)(jax.random.key(0))
  batch, key = fixed_batch(c), jax.random.key(3)
  s1, m1 = step1(state, batch, key)
  s8, m8 = step8(jax.device_put(state, state_sh8), batch, key)
  assert len(s8.params["conv_in"]["kernel"].sharding.device_set) == 8
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _one_step(c, loss_fn, microbatches, batch, key):
  """One train step on 1 device of `c`'s freshly initialised model with `loss_fn` and `microbatches`."""
  exp = train.build_experiment(c)
  opt = train.make_optimizer(**c.optimizer.to_dict(), num_steps=c.training.num_steps)
  init = train.abstract_train_state(c, exp, opt, sharding.create_mesh({"data": 1}, jax.devices()[:1]))[0]
  state = jax.jit(init)(jax.random.key(0))
  step = functools.partial(train.train_step, model=exp.model, loss_fn=loss_fn, optimizer=opt, ema_decay=0.9,
                           microbatches=microbatches)
  return exp, state, jax.jit(step)(state, batch, key)


def test_microbatches_give_the_full_batch_update():
  """With a loss that draws nothing, m parts give the full batch's step, on 1 and 8 devices."""
  from jaxdiff.models import MLP
  model = MLP(hidden=32, num_layers=2, time_dim=16)

  def loss_fn(net, x, key):  # per-example mean over the data, then over the batch
    return jnp.mean((net(x, jnp.linalg.norm(x, axis=-1)) - x) ** 2), {}

  x = jax.random.normal(jax.random.key(2), (16, 3))
  opt = train.make_optimizer(name="adam", learning_rate=1e-2)
  state = train.create_train_state(jax.random.key(0), model=model, optimizer=opt, example_x=x[:1])

  def step(m, devices):
    mesh = sharding.create_mesh({"data": len(devices)}, devices=devices)
    fn = functools.partial(train.train_step, model=model, loss_fn=loss_fn, optimizer=opt, ema_decay=0.9,
                           microbatches=m)
    return jax.jit(fn, in_shardings=(sharding.replicated(mesh), {"x": sharding.batch_sharding(mesh, 2)},
                                     sharding.replicated(mesh)))(state, {"x": x}, jax.random.key(3))

  s1, m1 = step(1, jax.devices()[:1])
  for m, devices in [(2, jax.devices()[:1]), (16, jax.devices()[:1]), (2, jax.devices())]:
    sm, mm = step(m, devices)
    np.testing.assert_allclose(mm["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(mm["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves((s1.params, s1.ema_params, s1.opt_state)),
                    jax.tree.leaves((sm.params, sm.ema_params, sm.opt_state))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(sm.step) == 1


def test_microbatch_parts_and_keys():
  """Part i is examples i, i+m, ... with key fold_in(key, i); the step's loss is their mean."""
  c = tiny()  # dropout on: the parts' dropout keys matter too
  loss_fn = train.make_loss(c, train.build_experiment(c).process)
  batch, key = fixed_batch(c, 8), jax.random.key(5)
  exp, state, (_, metrics) = _one_step(c, loss_fn, 2, batch, key)

  @jax.jit
  def part_loss(params, x, i):
    k_loss, k_drop = jax.random.split(jax.random.fold_in(key, i))
    net = train.network_fn(exp.model, params, train=True, dropout_key=k_drop)
    return loss_fn(net, x, k_loss)[0]

  parts = [float(part_loss(state.params, batch["x"][i::2], i)) for i in range(2)]
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(parts), rtol=1e-5)
  assert abs(parts[0] - parts[1]) > 1e-4  # (the check above can tell the parts apart)

  # the noise-conditional classifier's step splits its labels with its images
  from jaxdiff import losses
  from jaxdiff.models import NoiseClassifier
  clf = NoiseClassifier(num_classes=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                        num_groups=4)
  clf_loss = losses.make_classifier_loss(exp.process)
  opt = train.make_optimizer(name="adam", learning_rate=1e-3)
  state = train.create_train_state(jax.random.key(0), model=clf, optimizer=opt, example_x=batch["x"][:1])
  batch = dict(batch, label=jnp.arange(8) % 3)
  _, metrics = jax.jit(functools.partial(train.classifier_train_step, model=clf, loss_fn=clf_loss,
                                         optimizer=opt, ema_decay=0.9, microbatches=2))(state, batch, key)

  @jax.jit
  def part_metrics(params, x, labels, i):
    k_loss, k_drop = jax.random.split(jax.random.fold_in(key, i))
    net = train.network_fn(clf, params, train=True, dropout_key=k_drop)
    loss, aux = clf_loss(net, x, labels, k_loss)
    return loss, aux["accuracy"]

  parts = np.array([part_metrics(state.params, batch["x"][i::2], batch["label"][i::2], i) for i in range(2)])
  np.testing.assert_allclose(float(metrics["loss"]), parts[:, 0].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), parts[:, 1].mean(), rtol=1e-6)


def test_microbatches_config_and_bad_values(tmp_path):
  c = tiny()
  loss_fn = train.make_loss(c, train.build_experiment(c).process)
  with pytest.raises(ConfigError, match=r"microbatches=4 does not divide the batch of 6 examples"):
    _one_step(c, loss_fn, 4, fixed_batch(c, 6), jax.random.key(0))
  mesh = sharding.create_mesh({"data": 8})
  with pytest.raises(ConfigError, match=r"microbatches=4 does not divide the 2 examples each of the 8 "
                                        r"devices.*multiple of 32"):
    sharding.check_batch_size(16, mesh, microbatches=4)
  with pytest.raises(ConfigError, match=r"config.training.microbatches=0 must be >= 1"):
    train.build_experiment(tiny(training=dict(microbatches=0)))
  with pytest.raises(ConfigError, match=r"microbatches=3 does not divide the 2 examples"):
    train.train_and_evaluate(tiny(training=dict(batch_size=16, microbatches=3)), str(tmp_path))
  c = tiny(training=dict(microbatches=2))  # the loop's step gets the config's value
  exp = train.build_experiment(c)
  assert train.make_train_step(c, exp, train.make_optimizer()).keywords["microbatches"] == 2


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def final_params(c, workdir):
  exp = train.build_experiment(c)
  opt = train.make_optimizer(**c.optimizer.to_dict(), num_steps=c.training.num_steps)
  _, abstract, _ = train.abstract_train_state(c, exp, opt, sharding.create_mesh(c.mesh.to_dict()))
  return ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(c, workdir)).restore(abstract)[1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The tiny config trained for 4 steps in one go."""
  workdir = str(tmp_path_factory.mktemp("full"))
  c = tiny()
  train.train_and_evaluate(c, workdir)
  return c, workdir


def test_train_and_evaluate_writes_its_outputs(uninterrupted):
  c, workdir = uninterrupted
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [2, 4]
  assert all(np.isfinite(r["loss"]) and r["steps_per_sec"] > 0 for r in rows)
  for name in ("loss_curve.png", "samples_000004.png", "config.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_resume_continues_identically(uninterrupted, tmp_path):
  """Resume from a checkpoint_dir outside the workdir (as gs://... on a pod), then sample."""
  c, full_dir = uninterrupted
  workdir, ckpt_dir = str(tmp_path / "work"), str(tmp_path / "bucket" / "run")
  half = tiny(training=dict(num_steps=2))
  half.checkpoint_dir = ckpt_dir
  train.train_and_evaluate(half, workdir)
  resumed = tiny()
  resumed.checkpoint_dir = ckpt_dir
  train.train_and_evaluate(resumed, workdir)  # resumes at 2, runs to 4
  assert [r["loss"] for r in read_metrics(workdir)] == [r["loss"] for r in read_metrics(full_dir)]
  assert sorted(os.listdir(ckpt_dir)) == ["2", "4"] and not os.path.exists(os.path.join(workdir, "checkpoints"))
  a, b = final_params(c, full_dir), final_params(resumed, workdir)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  out = generate.generate(generate.load_config(workdir), workdir, method="ddim", num_steps=2, num_samples=8,
                          out_dir=str(tmp_path / "samples"))
  assert out["checkpoint_step"] == 4


def test_steps_per_call_gives_the_same_run(tmp_path, caplog, monkeypatch):
  """Calls of 2 steps (a lax.scan), with single steps where a log step falls inside a call."""
  traced, real = [], train.train_steps

  def spy(state, batches, key, **kw):
    traced.append(len(batches))
    return real(state, batches, key, **kw)

  monkeypatch.setattr(train, "train_steps", spy)
  runs = {}
  for k in (1, 2):
    c = tiny(training=dict(num_steps=6, log_every=3, checkpoint_every=6, steps_per_call=k,
                           num_final_samples=0))
    workdir = str(tmp_path / f"k{k}")
    with caplog.at_level("WARNING"):
      train.train_and_evaluate(c, workdir)
    runs[k] = read_metrics(workdir), final_params(c, workdir)
  assert "steps_per_call=2 does not divide training.log_every=3" in caplog.text
  assert traced == [2]  # the 2-step program was built (once) and used
  (rows1, state1), (rows2, state2) = runs[1], runs[2]
  assert [r["step"] for r in rows2] == [3, 6]
  np.testing.assert_allclose([r["loss"] for r in rows2], [r["loss"] for r in rows1], rtol=1e-5)
  np.testing.assert_allclose([r["grad_norm"] for r in rows2], [r["grad_norm"] for r in rows1], rtol=1e-5)
  assert int(state2.step) == 6
  for x, y in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state2.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_train_steps_reports_each_steps_nan(tmp_path, monkeypatch):
  """A NaN inside a multi-step call is reported at its own step, before any checkpoint."""
  real = sharding.global_batch
  calls = []

  def poisoned(local, mesh):
    calls.append(1)
    if len(calls) == 4:  # the batch of step 4: the second step of the call covering 3-4
      local = dict(local, x=np.full_like(local["x"], np.nan))
    return real(local, mesh)

  monkeypatch.setattr(sharding, "global_batch", poisoned)
  c = tiny(training=dict(num_steps=8, log_every=4, checkpoint_every=2, steps_per_call=2))
  with pytest.raises(NonFiniteLossError, match=r"step 4.*last good one, step 2"):
    train.train_and_evaluate(c, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_nan_loss_stops_before_a_checkpoint(tmp_path, monkeypatch):
  real = sharding.global_batch
  calls = []

  def poisoned(local, mesh):
    calls.append(1)
    if len(calls) >= 3:  # the batch of step 3 is NaN
      local = dict(local, x=np.full_like(local["x"], np.nan))
    return real(local, mesh)

  monkeypatch.setattr(sharding, "global_batch", poisoned)
  c = tiny(training=dict(num_steps=6, log_every=1))
  with pytest.raises(NonFiniteLossError, match=r"step 3.*last good one, step 2"):
    train.train_and_evaluate(c, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_batch_not_divisible_by_devices(tmp_path):
  with pytest.raises(ConfigError, match=r"batch_size=12 is not divisible by the 8 devices.*16"):
    train.train_and_evaluate(tiny(training=dict(batch_size=12)), str(tmp_path))


def test_checkpoint_mismatch_names_what_only_the_checkpoint_holds():
  from jaxdiff import checkpoint as ckpt_lib

  a = jax.ShapeDtypeStruct((2, 3), np.float32)
  saved = {"step": a, "params": {"w": a}, "teacher_params": {"w": a, "b": a}}
  assert ckpt_lib.shape_mismatches(saved, {"step": a, "params": {"w": a}}) == [
      "the checkpoint also holds teacher_params (2 arrays), which this config's train state has no place for"]
  assert ckpt_lib.shape_mismatches(saved, saved) == []
  assert ckpt_lib.shape_mismatches(saved, {**saved, "params": {"w": a, "v": a}}) == [
      "params/v is missing (expected shape (2, 3))"]


def test_restore_fields_reads_the_ema_parameters_of_another_layout(tmp_path):
  """Checkpointer.restore_fields (what sampling, evaluation and a teacher's loading restore): the
  EMA parameters of a checkpoint whose state has a field this config's lacks (a teacher), in the
  abstract state's shardings, where restoring the whole state refuses naming that field."""
  mesh = sharding.create_mesh({"data": -1})
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  tree = lambda v: {"w": jnp.full((8, 3), v), "b": jnp.full((3,), v)}  # noqa: E731
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ck.save(5, train.DistillState(step=jnp.array(5), params=tree(1.0), ema_params=tree(2.0), opt_state=(tree(3.0),),
                                teacher_params=tree(4.0)))
  spec = lambda a, sh=None: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)  # noqa: E731
  ema = {"w": spec(tree(0.0)["w"], rows), "b": spec(tree(0.0)["b"], rows.update(spec=jax.sharding.PartitionSpec()))}
  abstract = train.TrainState(step=spec(jnp.array(0)), params=jax.tree.map(spec, tree(0.0)), ema_params=ema,
                              opt_state=(jax.tree.map(spec, tree(0.0)),))
  step, got = ck.restore_fields(abstract, ("ema_params",))
  assert step == 5 and set(got) == {"ema_params"}
  np.testing.assert_array_equal(np.asarray(got["ema_params"]["w"]), np.full((8, 3), 2.0))
  assert got["ema_params"]["w"].sharding == rows
  with pytest.raises(CheckpointError, match=r"also holds teacher_params \(2 arrays\)"):
    ck.restore(abstract)
  with pytest.raises(CheckpointError, match=r"ema_params/w has shape \(8, 3\) in the checkpoint but \(8, 4\)"):
    ck.restore_fields(abstract.replace(ema_params={**ema, "w": jax.ShapeDtypeStruct((8, 4), jnp.float32)}),
                      ("ema_params",))
  with pytest.raises(CheckpointError, match="target_params is missing"):
    ck.restore_fields(train.TargetState(**vars(abstract), target_params=ema), ("target_params",))
  ck.close()


def test_checkpoint_mismatch_and_missing_step(uninterrupted, tmp_path):
  _, workdir = uninterrupted
  wider = tiny(model=dict(ch=16))
  with pytest.raises(CheckpointError, match=r"does not match the config: .*has shape"):
    train.train_and_evaluate(wider, workdir)
  with pytest.raises(CheckpointError, match=r"step=3 does not exist.*\[2, 4\]"):
    generate.generate(tiny(), workdir, step=3, num_samples=8)
  with pytest.raises(CheckpointError, match="no checkpoint found"):
    generate.generate(tiny(), str(tmp_path), num_samples=8)


def test_config_validation_errors():
  with pytest.raises(ConfigError, match="resolution=12 cannot pass"):
    train.build_experiment(tiny(data=dict(resolution=12), model=dict(ch_mult=(1, 2, 2, 2))))
  with pytest.raises(ConfigError, match="attn_resolutions"):
    train.build_experiment(tiny(model=dict(attn_resolutions=(3,))))
  with pytest.raises(ConfigError, match="valid keys"):
    c = tiny()
    c.model.unlock()
    c.model.chh = 3
    train.build_experiment(c)
  with pytest.raises(ConfigError, match="needs a multiple of 3 devices"):
    sharding.create_mesh({"data": 3})


def test_generate_writes_png_and_npz(uninterrupted, tmp_path):
  c, workdir = uninterrupted
  out = generate.generate(c, workdir, method="ddpm", num_steps=5, num_samples=12, out_dir=str(tmp_path))
  assert out["nfe"] == 5 and out["checkpoint_step"] == 4
  imgs = np.load(out["paths"]["npz"])["images"]
  assert imgs.shape == (12, 8, 8, 3) and imgs.dtype == np.uint8
  assert os.path.getsize(out["paths"]["png"]) > 0

"""`config.training.init_from`: a run that starts from published weights (jaxdiff.models.pretrained).

score_sde's (JAX) checkpoint here is the T3 fixture network of tests/fixtures/score_sde_tiny/
(its own flax params, written as score_sde's run_lib writes a checkpoint); the diffusers one
is tests/fixtures/diffusers_tiny.
"""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import serialization, traverse_util

from conftest import load_config
from jaxdiff import configs, models, train
from jaxdiff.errors import ConfigError, InputError
from jaxdiff.models import pretrained
from jaxdiff.models.convert_score_sde import convert_score_sde_flax_params, ncsnpp_kwargs_from_score_sde
from test_train import final_params, read_metrics

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _score_sde_checkpoint(directory):
  """score_sde's T3 network (ddpm blocks, input_skip 'cat', positional; VP) as a score_sde checkpoint."""
  with open(os.path.join(FIXTURES, "score_sde_tiny", "T3.json")) as f:
    cfg = json.load(f)
  arrays = np.load(os.path.join(FIXTURES, "score_sde_tiny", "T3_flax.npz"))
  ema = traverse_util.unflatten_dict({tuple(k[len("param/"):].split("/")): arrays[k].astype(np.float32)
                                      for k in arrays.files if k.startswith("param/")})
  state = dict(step=np.int32(5), optimizer={"target": jax.tree.map(lambda a: 0 * a, ema), "state": {}},
               lr=np.float32(2e-4), model_state={}, ema_rate=np.float32(0.999), params_ema=ema,
               rng=np.zeros((2,), np.uint32))
  os.makedirs(directory)
  with open(os.path.join(directory, "checkpoint_5"), "wb") as f:
    f.write(serialization.msgpack_serialize(state))
  return cfg, ema


def _config(cfg, **training):
  c = load_config("tiny")
  c.model = configs.model_section("ncsnpp", **ncsnpp_kwargs_from_score_sde(cfg, {"centered": cfg["centered"]}))
  c.process = ml_collections.ConfigDict(dict(name="vp", beta_min=0.1, beta_max=20.0, eps=1e-3))
  c.training.update(num_final_samples=0, **training)
  return c


def test_a_run_starts_from_a_score_sde_checkpoint_and_trains_on(tmp_path):
  cfg, ema = _score_sde_checkpoint(str(tmp_path / "score_sde" / "checkpoints"))
  init_from = f"score_sde:{tmp_path / 'score_sde' / 'checkpoints'}"
  workdir = str(tmp_path / "run")

  # num_steps=0: an import, the step-0 checkpoint of the converted EMA weights (no data read).
  imported = _config(cfg, init_from=init_from, num_steps=0)
  train.train_and_evaluate(imported, workdir)
  state = final_params(imported, workdir)
  net = train.build_experiment(imported).model
  want = convert_score_sde_flax_params(ema, net, (8, 8, 3))
  assert int(state.step) == 0
  for got in (state.params, state.ema_params):
    jax.tree.map(np.testing.assert_array_equal, got, want)

  # Trained on from there (a larger num_steps, the same workdir): the data starts afresh.
  more = _config(cfg, init_from=init_from, num_steps=2, log_every=2, checkpoint_every=2)
  train.train_and_evaluate(more, workdir)
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [2] and np.isfinite(rows[0]["loss"])
  state = final_params(more, workdir)
  assert int(state.step) == 2
  assert not np.array_equal(state.params["conv_in"]["kernel"], want["conv_in"]["kernel"])


def test_init_from_errors(tmp_path):
  cfg, _ = _score_sde_checkpoint(str(tmp_path / "ckpts"))
  init_from = f"score_sde:{tmp_path / 'ckpts'}"
  with pytest.raises(ConfigError, match="not '<source>:<path>'"):
    configs.validate(_config(cfg, init_from="ddpm-cifar10"))
  with pytest.raises(ConfigError, match=r"holds a 'ncsnpp' network, but config.model.name='unet'"):
    c = load_config("tiny")
    c.training.init_from = f"score_sde_pytorch:{tmp_path / 'w.npz'}"
    configs.validate(c)
  with pytest.raises(ConfigError, match="prediction=eps"):
    c = _config(cfg, init_from=init_from)
    c.loss.prediction = "x0"
    configs.validate(c)
  with pytest.raises(ConfigError, match="num_steps=0 must be >= 1 .0 only with config.training.init_from"):
    configs.validate(_config(cfg, num_steps=0))
  # The file is read when the run starts: a missing checkpoint, another network width.
  with pytest.raises(InputError, match="does not exist"):
    train.train_and_evaluate(_config(cfg, init_from=f"score_sde:{tmp_path / 'nope'}", num_steps=0),
                             str(tmp_path / "a"))
  with pytest.raises(InputError, match="has shapes"):
    c = _config(cfg, init_from=init_from, num_steps=0)
    c.model.ch = 16
    train.train_and_evaluate(c, str(tmp_path / "b"))


def test_diffusers_init_names_the_config_keys_to_set():
  path = os.path.join(FIXTURES, "diffusers_tiny")
  init_from = f"diffusers:{path}"
  c = load_config("tiny")  # an 8x8 U-Net, ch 8, (1, 2); the fixture's has attention at 8x8 (16x16 data)
  net = models.create_model(**c.model.to_dict())
  with pytest.raises(ConfigError, match=r"--config.model.attn_resolutions='\(8,\)'"):
    pretrained.load_pretrained(init_from, net, (16, 16, 3))
  c.model.attn_resolutions = (8,)
  c.data.resolution = 16
  net = models.create_model(**c.model.to_dict())
  params = pretrained.load_pretrained(init_from, net, (16, 16, 3))
  abstract = jax.eval_shape(lambda: net.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32),
                                             np.ones((1,), np.float32), train=False))["params"]
  pretrained.check_fits(params, abstract, init_from)
  with pytest.raises(ConfigError, match=r"does not fit config.model .* in the checkpoint"):
    pretrained.check_fits({**params, "conv_in": {"kernel": np.zeros((3, 3, 3, 4))}}, abstract, init_from)

"""The VE (NCSN) and VP-continuous configs train end to end and sample with the SDE/ODE methods.

Each `:runlocal` variant is shrunk below configs/tiny.py's sizes (8x8 images, a one-level
U-Net with 8 channels and no attention, batch 8, 3 steps): compiling the train step and the
samplers for the 8 test devices is most of the time.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import load_config
from jaxdiff import generate, samplers, train
from jaxdiff.errors import ConfigError
from jaxdiff.processes import VE, VP

# config name -> (process class, the sampling methods to run on its checkpoint)
CASES = {
    "cifar10_ncsn_ve": (VE, ("pc", "ode", "heun")),
    "cifar10_vp_continuous": (VP, ("pc", "ode", "dpm_solver++")),
    "cifar10_ncsnpp": (VE, ("pc",)),  # NCSN++ (jaxdiff.models.ncsnpp); its numbers: test_ncsnpp.py
}


def shrunk(name: str):
  c = load_config(name, "runlocal")
  c.data.update(resolution=8, num_examples=64, num_threads=1)
  c.model.update(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
  if "num_groups" in c.model:  # the U-Net's; NCSN++ uses min(C // 4, 32)
    c.model.num_groups = 4
  c.optimizer.update(warmup_steps=1)
  c.training.update(batch_size=8, num_steps=3, log_every=1, checkpoint_every=3, keep_checkpoints=1,
                    num_final_samples=0)
  c.sampling.update(num_steps=4, batch_size=8)
  return c


def test_full_configs_describe_the_score_sde_setups():
  ve = load_config("cifar10_ncsn_ve")
  assert dict(ve.process) == {"name": "ve", "sigma_min": 0.01, "sigma_max": 50.0, "eps": 1e-5}
  assert (ve.loss.prediction, ve.loss.weighting, ve.data.centered) == ("eps", "none", False)
  assert (ve.sampling.method, ve.sampling.predictor, ve.sampling.snr, ve.sampling.num_steps) == (
      "pc", "reverse_diffusion", 0.16, 1000)
  vp = load_config("cifar10_vp_continuous")
  assert dict(vp.process) == {"name": "vp", "beta_min": 0.1, "beta_max": 20.0, "eps": 1e-3}
  assert (vp.loss.prediction, vp.sampling.method, vp.sampling.rtol) == ("eps", "ode", 1e-5)
  ncsnpp, ddpmpp = load_config("cifar10_ncsnpp"), load_config("cifar10_ddpmpp")
  assert (ncsnpp.process.name, ncsnpp.model.name, ncsnpp.model.fir, ncsnpp.model.embedding_type,
          ncsnpp.model.center_input, ncsnpp.data.centered) == ("ve", "ncsnpp", True, "fourier", True, False)
  assert (ddpmpp.process.name, ddpmpp.model.fir, ddpmpp.model.embedding_type, ddpmpp.model.progressive_input,
          ddpmpp.sampling.predictor, ddpmpp.sampling.n_corrector_steps) == (
              "vp", False, "positional", "none", "euler_maruyama", 0)
  for c in (ve, vp, ncsnpp, ddpmpp):
    exp = train.build_experiment(c)  # validates; builds the process and model from the replaced sections
    assert exp.data_spec.shape == (32, 32, 3)
  # NCSN++'s Fourier embedding takes log(sigma): only the VE process gives it sigma > 0.
  ncsnpp.process = vp.process
  with pytest.raises(ConfigError, match="embedding_type='positional'"):
    train.build_experiment(ncsnpp)
  with pytest.raises(ValueError, match="'runlocal'"):
    load_config("cifar10_ncsn_ve", "local")


@pytest.mark.parametrize("name", sorted(CASES))
def test_runlocal_trains_and_samples(name, tmp_path, monkeypatch):
  process_cls, methods = CASES[name]
  c = shrunk(name)
  workdir = str(tmp_path / "run")
  metrics = train.train_and_evaluate(c, workdir)
  assert metrics["step"] == 3 and math.isfinite(metrics["loss"]), metrics
  # run_sample.py's view of the run: the saved config, on today's defaults for its network
  saved = generate.load_config(workdir).model.to_dict()
  assert saved == json.loads(json.dumps(c.model.to_dict()))  # (tuples come back as lists)
  assert isinstance(train.build_experiment(c).process, process_cls)

  captured = []
  save = generate.save_samples

  def capture(x, exp, prefix, **kw):
    captured.append(np.asarray(x))
    return save(x, exp, prefix, **kw)

  monkeypatch.setattr(generate, "save_samples", capture)
  for method in methods:
    result = generate.generate(c, workdir, method=method, num_samples=8, batch_size=8,
                               out_dir=str(tmp_path / method))
    x = captured[-1]
    assert x.shape == (8, 8, 8, 3) and np.all(np.isfinite(x)), method
    lo = -1.0 if c.data.centered else 0.0
    assert x.min() >= lo - 1e-5 and x.max() <= 1.0 + 1e-5  # clip_denoised: x0_hat in the data range
    m = samplers.METHODS[method]
    if m.solve is None:  # fixed-step: NFE is (grid - 1) * per-step + final
      opts = {**m.options, **generate.sampler_options(c, method)}
      assert result["nfe"] == m.fixed_nfe(opts, c.sampling.num_steps), (method, result["nfe"])
    else:
      assert result["nfe"] >= 7, result

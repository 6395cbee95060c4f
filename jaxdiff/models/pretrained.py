"""Published weights, or another jaxdiff run's, as a run's starting point: `config.training.init_from`.

A fresh run (no checkpoint in its workdir yet) starts from converted weights instead of a
random init; the EMA copy starts from them too, the optimizer state is fresh and the step
is 0. A run that resumes from its own checkpoint ignores `init_from`.

  'score_sde:<path>'          a score_sde (JAX) checkpoint: `<workdir>/checkpoints/checkpoint_<n>`
                              or that directory (the latest); its EMA weights -> NCSNpp (its
                              `ncsnpp` networks) or UNet (its `ddpm`; `up_attn_every_block=False`)
  'score_sde_pytorch:<path>'  a score_sde_pytorch state dict saved as .npz (how:
                              `jaxdiff.models.convert_score_sde`) -> NCSNpp
  'diffusers:<path>'          a diffusers `UNet2DModel` directory (or its .safetensors) -> UNet,
                              or a `DiTTransformer2DModel` one -> DiT (eps only: a learned
                              variance is dropped)
  'jaxdiff:<workdir>'         another jaxdiff run's EMA weights (its latest checkpoint;
                              'jaxdiff:<workdir>@<step>': that step's): fine-tuning, e.g.
                              consistency training from a diffusion model (Geng et al. 2024)

The config's network must be the checkpoint's: the same sizes (`config.model`, e.g.
`configs/cifar10_ncsnpp.py` for score_sde's NCSN++ cont.) and the same data shape; a
mismatch is a ConfigError naming the first differing arrays (and, for diffusers, the
config keys to set; for a jaxdiff run, the differing config.model and config.loss.prediction
keys: only the compute dtype and dropout may differ). score_sde's networks predict eps
(`config.loss.prediction='eps'`); a VE checkpoint's output (-eps, score_sde's
`scale_by_sigma`) is negated on the way in.

With `config.training.num_steps=0` the run only imports: it writes the step-0 checkpoint
(and, if `num_final_samples` > 0, a sample grid) without reading any data, and
`run_sample.py --workdir` then samples from it. Training it further later (a larger
`num_steps`, same workdir) starts the data from the beginning.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import numpy as np

from jaxdiff.errors import ConfigError, split_source

# source -> the jaxdiff networks its checkpoints can hold (config.model.name)
SOURCES = {"score_sde": ("ncsnpp", "unet"), "score_sde_pytorch": ("ncsnpp",), "diffusers": ("unet", "dit"),
           "jaxdiff": ("unet", "ncsnpp", "dit", "mlp")}
FREE_MODEL_KEYS = ("dtype", "dropout")  # config.model keys a run may change from the run it starts from
KEY = "config.training.init_from"


def parse_init_from(init_from: str) -> tuple[str, str]:
  """'<source>:<path>' -> (source, path); a ConfigError naming the valid forms otherwise."""
  return split_source(KEY, init_from, SOURCES, "use 'score_sde:<checkpoint_n or its directory>', "
                      "'score_sde_pytorch:<state dict .npz>', 'diffusers:<UNet2DModel or DiT dir>' or "
                      "'jaxdiff:<run workdir>[@<step>]' (or '' for a random init)")


def validate_init_from(init_from: str, model_name: str, prediction: str) -> None:
  """The checks that need only the config (the file is read when the run starts)."""
  source, _ = parse_init_from(init_from)
  want = SOURCES[source]
  if model_name not in want:
    example = "configs/cifar10_ncsnpp.py or cifar10_ddpmpp.py" if want[0] == "ncsnpp" else "configs/cifar10_ddpm.py"
    raise ConfigError(f"{KEY}={init_from!r} holds a {' or '.join(map(repr, want))} network, but "
                      f"config.model.name={model_name!r}; use a config whose model is {want[0]!r} (e.g. {example}).")
  if source.startswith("score_sde") and prediction != "eps":
    raise ConfigError(f"{KEY}={init_from!r}: score_sde's networks predict eps, but config.loss.prediction="
                      f"{prediction!r}; set --config.loss.prediction=eps.")


def load_pretrained(init_from: str, model: nn.Module, image_shape: tuple[int, ...], *,
                    negate_output: bool = False) -> dict[str, Any]:
  """The converted parameters `init_from` names, for `model` on images of `image_shape` (numpy / jax
  arrays, float32). `negate_output` for score_sde VE checkpoints (their output is -eps)."""
  source, path = parse_init_from(init_from)
  if source == "jaxdiff":
    raise ConfigError(f"load_pretrained reads published files; {init_from!r} is a jaxdiff run, whose EMA "
                      f"parameters evaluate.load_run_params restores (as train does).")
  if source == "diffusers":
    from jaxdiff.models import convert_diffusers
    from jaxdiff.models.dit import DiT

    is_dit = isinstance(model, DiT)
    kwargs, params = (convert_diffusers.load_diffusers_dit if is_dit else convert_diffusers.load_diffusers_unet)(path)
    # dropout does not change the function at eval time: fine-tuning may use another rate.
    kwargs.pop("dropout", None)
    if getattr(model, "out_channels", None) is None and kwargs.get("out_channels") == image_shape[-1]:
      kwargs.pop("out_channels")  # None: as many as the input has
    differ = {k: v for k, v in kwargs.items() if canonical_value(getattr(model, k, None)) != canonical_value(v)}
    if differ:
      fix = " ".join(f"--config.model.{k}={_flag(v)}" for k, v in differ.items())
      raise ConfigError(f"{KEY}={init_from!r} is a {type(model).__name__}("
                        f"{', '.join(f'{k}={v!r}' for k, v in differ.items())}) "
                        f"but config.model differs there; set {fix}.")
    return params
  from jaxdiff.models import convert_score_sde as conv

  shape = tuple(image_shape)
  if source == "score_sde":
    return conv.convert_score_sde_flax_params(conv.load_score_sde_checkpoint(path), model, shape,
                                              negate_output=negate_output)
  try:
    with np.load(path) as f:
      state_dict = {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise ConfigError(f"{KEY}={init_from!r}: cannot read {path!r} as an .npz state dict ({e}); save "
                      f"score_sde_pytorch's weights as the convert_score_sde docstring shows.") from None
  return conv.convert_score_sde_state_dict(state_dict, model, shape, negate_output=negate_output)


def check_jaxdiff_run(init_from: str, config, run_config, is_consistency: bool, run_is_consistency: bool) -> None:
  """A jaxdiff run as this run's start: the same network (but its compute dtype and dropout) with the
  same output parameterization, and a consistency model only for another consistency model."""
  if run_config.model.name in ("classifier", "autoencoder") or run_config.model.name != config.model.name:
    raise ConfigError(f"{KEY}={init_from!r} holds a {run_config.model.name!r} network, but config.model.name="
                      f"{config.model.name!r}; start from that run's config file.")
  diffs = network_differences(config, run_config, "there")
  if diffs:
    raise ConfigError(f"{KEY}={init_from!r}: this run starts from that run's network, so the configs must agree; "
                      f"they differ in " + "; ".join(diffs) + ". Set those keys to that run's values (only "
                      "model.dtype and model.dropout may differ).")
  if run_is_consistency and not is_consistency:
    raise ConfigError(f"{KEY}={init_from!r} holds a consistency model, whose output is not a diffusion model's "
                      f"denoiser; start a consistency model from it, or start from a diffusion model's run.")


def network_differences(config, other, there: str) -> list[str]:
  """Where `config` and `other`, the config of a run it starts from (a teacher, an init), differ in
  the network: config.model but `FREE_MODEL_KEYS`, and config.loss.prediction (what its output
  means); each as 'key: <here> here, <other's> <there>'."""
  mine, theirs = ({k: v for k, v in c.model.to_dict().items() if k not in FREE_MODEL_KEYS} for c in (config, other))
  diffs = [f"model.{k}: {mine.get(k)!r} here, {theirs.get(k)!r} {there}" for k in sorted(set(mine) | set(theirs))
           if canonical_value(mine.get(k)) != canonical_value(theirs.get(k))]
  if config.loss.prediction != other.loss.prediction:
    diffs.append(f"loss.prediction: {config.loss.prediction!r} here, {other.loss.prediction!r} {there}")
  return diffs


def canonical_value(v: Any) -> Any:
  """A config value as saved JSON and a live config compare: lists as tuples, whole floats as ints."""
  if isinstance(v, (list, tuple)):
    return tuple(canonical_value(x) for x in v)
  if isinstance(v, float) and math.isfinite(v) and v == int(v):
    return int(v)
  return v


def check_fits(params: Any, abstract_params: Any, init_from: str) -> None:
  """`params` has exactly the config's parameter tree (names and shapes)."""
  from jaxdiff.checkpoint import shape_mismatches

  bad = shape_mismatches(params, abstract_params)
  if bad:
    raise ConfigError(f"{KEY}={init_from!r} does not fit config.model (e.g. {'; '.join(bad)}); set "
                      f"config.model to the checkpoint's network.")


def _flag(v: Any) -> str:
  return f"'{tuple(v)}'" if isinstance(v, (list, tuple)) else str(v)

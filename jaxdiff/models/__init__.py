"""Score / denoiser networks, built from a config with `create_model(**config.model)`."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.errors import ConfigError
from jaxdiff.models.autoencoder import AutoencoderKL
from jaxdiff.models.classifier import NoiseClassifier
from jaxdiff.models.discriminator import PatchDiscriminator
from jaxdiff.models.dit import DiT, dit_size
from jaxdiff.models.mlp import MLP
from jaxdiff.models.ncsnpp import NCSNpp
from jaxdiff.models.unet import UNet

MODELS = {"unet": UNet, "ncsnpp": NCSNpp, "dit": DiT, "mlp": MLP, "classifier": NoiseClassifier,
          "autoencoder": AutoencoderKL}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str, what: str = "dtype"):
  """A dtype name as a jnp dtype; 'auto' is bfloat16 on GPU/TPU and float32 on CPU.

  bfloat16 compute runs the matmuls and convolutions at the accelerators' full rate; on
  CPU it is slower than float32 (XLA:CPU emulates most bf16 ops), so mixed precision
  configs say 'auto' and keep float32 parameters (`param_dtype`), optimizer state and loss.
  """
  if name == "auto" and what.endswith("param_dtype"):
    raise ConfigError(f"{what}='auto' is not supported; parameters stay float32 (the default) for mixed "
                      f"precision, 'auto' is for config.model.dtype (the compute dtype).")
  if name == "auto":
    import jax
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
  if name not in DTYPES:
    raise ConfigError(f"{what}={name!r} is not supported; use one of {', '.join(DTYPES)} or 'auto'.")
  return DTYPES[name]


def create_model(name: str, **kwargs) -> nn.Module:
  """`create_model(name="unet", ch=128, ...)`: the network class `name` with typed fields."""
  cls = MODELS.get(name)
  if cls is None:
    raise ConfigError(f"config.model.name={name!r} is not known; valid names: {', '.join(MODELS)}.")
  fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ConfigError(f"config.model has key(s) {unknown} that {cls.__name__} does not take; "
                      f"valid keys: {', '.join(sorted(fields))}. To use another network than the config's, "
                      f"replace the whole section in a config file: c.model = "
                      f"jaxdiff.configs.model_section({name!r}, ...).")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  for key in ("dtype", "param_dtype"):
    if isinstance(kwargs.get(key), str):
      kwargs[key] = resolve_dtype(kwargs[key], f"config.model.{key}")
  return cls(**kwargs)


__all__ = ["MLP", "UNet", "NCSNpp", "DiT", "dit_size", "NoiseClassifier", "AutoencoderKL", "PatchDiscriminator",
           "MODELS", "create_model"]

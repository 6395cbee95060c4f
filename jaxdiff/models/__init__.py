"""Score / denoiser networks, built from a config with `create_model(**config.model)`."""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from jaxdiff.errors import ConfigError
from jaxdiff.models.mlp import MLP
from jaxdiff.models.unet import UNet

MODELS = {"unet": UNet, "mlp": MLP}


def create_model(name: str, **kwargs) -> nn.Module:
  """`create_model(name="unet", ch=128, ...)`: the network class `name` with typed fields."""
  cls = MODELS.get(name)
  if cls is None:
    raise ConfigError(f"config.model.name={name!r} is not known; valid names: {', '.join(MODELS)}.")
  fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ConfigError(f"config.model has key(s) {unknown} that {cls.__name__} does not take; "
                      f"valid keys: {', '.join(sorted(fields))}.")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return cls(**kwargs)


__all__ = ["MLP", "UNet", "MODELS", "create_model"]

"""jaxdiff: diffusion generative models in JAX/Flax.

The pure functions researchers import:

  from jaxdiff import processes, losses, parameterization
  from jaxdiff import sample            # every sampler behind one call
  from jaxdiff.models import UNet, MLP

See README.md for the API tour.
"""

from jaxdiff import xla_flags

xla_flags.apply_defaults()  # before any JAX computation runs; see jaxdiff/xla_flags.py

from jaxdiff import errors  # noqa: E402
from jaxdiff import parameterization  # noqa: E402
from jaxdiff import processes  # noqa: E402
from jaxdiff import losses  # noqa: E402
from jaxdiff.samplers import sample  # noqa: E402
from jaxdiff.likelihood import bits_per_dim, log_likelihood  # noqa: E402

__version__ = "0.1.0"

__all__ = ["errors", "parameterization", "processes", "losses", "sample", "__version__"]
__all__ += ["log_likelihood", "bits_per_dim"]

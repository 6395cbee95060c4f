"""jaxdiff: diffusion generative models in JAX/Flax.

The pure functions researchers import:

  from jaxdiff import processes, losses, parameterization
  from jaxdiff import sample            # every sampler behind one call
  from jaxdiff.models import UNet, MLP

See README.md for the API tour.
"""

from jaxdiff import errors
from jaxdiff import parameterization
from jaxdiff import processes
from jaxdiff import losses
from jaxdiff.samplers import sample
from jaxdiff.likelihood import bits_per_dim, log_likelihood

__version__ = "0.1.0"

__all__ = ["errors", "parameterization", "processes", "losses", "sample", "__version__"]
__all__ += ["log_likelihood", "bits_per_dim"]

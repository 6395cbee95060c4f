r"""Trains a diffusion model; resumes from the latest checkpoint in --workdir.

  python run_train.py --config configs/quickstart.py --workdir runs/quickstart
  python run_train.py --config configs/cifar10_ddpm.py --workdir runs/c10 \
      --config.training.batch_size=256

Multi-host: on Cloud TPU / SLURM / Open MPI nothing extra is needed; elsewhere pass
--coordinator_address, --num_processes and --process_id on every host.
"""

from absl import app, flags
from ml_collections import config_flags

from jaxdiff import cli, errors, sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with auto-detection "
                               "(Cloud TPU pods, SLURM, Open MPI).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.setup_logging()
  with errors.one_line_errors():
    if _MULTIHOST.value or _COORD.value is not None:
      sharding.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_one_line)

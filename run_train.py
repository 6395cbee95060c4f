r"""Trains a diffusion model; resumes from the latest checkpoint in --workdir.

  python run_train.py --config configs/quickstart.py --workdir runs/quickstart
  python run_train.py --config configs/cifar10_ddpm.py --workdir runs/c10 \
      --config.training.batch_size=256

Multi-host: run the same command on every host, adding --distributed=auto on Cloud TPU pod
slices and under SLURM (srun) / Open MPI (mpirun), or elsewhere --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (I = 0..N-1); --distributed_timeout bounds the wait for the
others. --workdir must be a directory all hosts share (NFS, or a bucket mounted with gcsfuse).
"""

from absl import app, flags
from ml_collections import config_flags

from jaxdiff import cli, errors, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.setup_logging()
  with errors.one_line_errors():
    cli.initialize_distributed_from_flags()
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.restart_with_tcmalloc()  # JAXDIFF_TCMALLOC=1: faster CPU steps, more memory (jaxdiff/cli.py)
  app.run(main, flags_parser=cli.parse_flags_one_line)

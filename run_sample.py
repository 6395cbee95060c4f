r"""Draws samples from a trained model's EMA parameters; writes a PNG grid and an .npz.

  python run_sample.py --workdir runs/quickstart --sampler ddim --steps 50 --num_samples 64
  python run_sample.py --workdir runs/quickstart --sampler ddpm --steps 1000 --step 2000

The config is read from <workdir>/config.json unless --config is given.
"""

from absl import app, flags
from ml_collections import config_flags

from jaxdiff import cli, errors, generate, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (default: the workdir's).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampling method (default: config.sampling.method); "
                               "'ddpm' is 'ancestral'. See README for the list.")
_STEPS = flags.DEFINE_integer("steps", None, "Number of sampling steps (default: config.sampling.num_steps).")
_NUM = flags.DEFINE_integer("num_samples", 64, "Number of samples.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Samples per device batch (default: config.sampling.batch_size).")
_OPTS = flags.DEFINE_list("sampler_options", [], "Method options as name=value, e.g. eta=0.5.")
_OUT = flags.DEFINE_string("out_dir", None, "Output directory (default: <workdir>/samples).")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.setup_logging()
  with errors.one_line_errors():
    if _COORD.value is not None:
      sharding.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
    config = _CONFIG.value or generate.load_config(_WORKDIR.value)
    generate.generate(config, _WORKDIR.value, step=_STEP.value, method=_SAMPLER.value,
                      num_steps=_STEPS.value, num_samples=_NUM.value, seed=_SEED.value,
                      batch_size=_BATCH.value, options=cli.parse_options(_OPTS.value),
                      out_dir=_OUT.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_one_line)

r"""Draws samples from a trained model's EMA parameters; writes a PNG grid and an .npz.

  python run_sample.py --workdir runs/quickstart --sampler ddim --steps 50 --num_samples 64
  python run_sample.py --workdir runs/quickstart --sampler ddpm --steps 1000 --step 2000

With --mode=likelihood it evaluates bits/dim on the test split instead and writes
<workdir>/eval/likelihood_<method>_step<step>.json:

  python run_sample.py --workdir runs/quickstart --mode likelihood --likelihood_method ode
  python run_sample.py --workdir runs/quickstart --mode likelihood --likelihood_method vlb --vlb_timesteps 50

The config is read from <workdir>/config.json unless --config is given.
"""

from absl import app, flags
from ml_collections import config_flags

from jaxdiff import cli, errors, evaluate, generate, samplers, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (default: the workdir's).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampling method (default: config.sampling.method); "
                               "'ddpm' is 'ancestral'. Methods:\n" + samplers.describe_methods())
_STEPS = flags.DEFINE_integer("steps", None, "Number of sampling steps (default: config.sampling.num_steps).")
_NUM = flags.DEFINE_integer("num_samples", 64, "Number of samples.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (all devices together) per sampling/evaluation call "
                             "(default: config.sampling.batch_size; likelihood: config.training.batch_size).")
_OPTS = flags.DEFINE_list("sampler_options", [], "Method options as name=value, e.g. eta=0.5.")
_OUT = flags.DEFINE_string("out_dir", None, "Output directory (default: <workdir>/samples; likelihood: "
                           "<workdir>/eval).")
_MODE = flags.DEFINE_enum("mode", "sample", ["sample", "likelihood"], "Draw samples, or evaluate bits/dim.")
_LMETHOD = flags.DEFINE_enum("likelihood_method", "ode", ["ode", "vlb"],
                             "Probability-flow ODE, or the DDPM variational bound.")
_NUM_EX = flags.DEFINE_integer("num_examples", None, "Test examples to evaluate (default: the whole split).")
_RTOL = flags.DEFINE_float("rtol", 1e-5, "Likelihood ODE relative tolerance.")
_ATOL = flags.DEFINE_float("atol", 1e-5, "Likelihood ODE absolute tolerance.")
_REPEATS = flags.DEFINE_integer("n_repeats", 1, "Dequantization draws averaged per image (ODE).")
_VLB_T = flags.DEFINE_integer("vlb_timesteps", None, "Timesteps sampled per image for the bound "
                              "(default: all of them).")
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
    if _MODE.value == "likelihood":
      evaluate.evaluate_likelihood(config, _WORKDIR.value, step=_STEP.value, num_examples=_NUM_EX.value,
                                   batch_size=_BATCH.value, method=_LMETHOD.value, seed=_SEED.value,
                                   n_repeats=_REPEATS.value, rtol=_RTOL.value, atol=_ATOL.value,
                                   vlb_timesteps=_VLB_T.value, out_dir=_OUT.value)
      return
    generate.generate(config, _WORKDIR.value, step=_STEP.value, method=_SAMPLER.value,
                      num_steps=_STEPS.value, num_samples=_NUM.value, seed=_SEED.value,
                      batch_size=_BATCH.value, options=cli.parse_options(_OPTS.value),
                      out_dir=_OUT.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_one_line)

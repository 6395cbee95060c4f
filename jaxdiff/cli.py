"""What run_train.py and run_sample.py share: one-line flag errors, options, multi-host flags,
the restart with tcmalloc."""

from __future__ import annotations

import sys

from absl import flags


def parse_flags_one_line(argv: list[str]) -> list[str]:
  """absl flags parser that reports bad flags and misspelt config overrides in one line.

  ml_collections raises a bare AttributeError/KeyError (with a "did you mean" hint) for an
  override of a key the config does not have; this turns it and absl's own flag errors into
  `error: ...` on stderr and exit status 2.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    msg = " ".join(str(e).split())
  except (AttributeError, KeyError) as e:
    detail = " ".join(str(e).replace("\\n", " ").replace("'", "").split())
    msg = f"unknown config key in an override: {detail}. Keys are fixed by the config file; check the spelling."
  except (ValueError, TypeError) as e:
    msg = f"bad config override: {' '.join(str(e).split())}"
  print(f"error: {msg}", file=sys.stderr, flush=True)
  raise SystemExit(2)


def parse_options(items: list[str] | None, flag: str = "--sampler_options") -> dict:
  """["eta=0.5", "snr=0.16"] -> {"eta": 0.5, "snr": 0.16} (values parsed as Python literals)."""
  import ast

  from jaxdiff.errors import InputError

  out = {}
  for item in items or []:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise InputError(f"{flag}={item!r} must look like name=value (e.g. {flag}=eta=0.5).")
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out


def setup_logging() -> None:
  """Progress lines from jaxdiff on stderr; other libraries' INFO chatter (orbax) off."""
  import logging as py_logging

  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  logger = py_logging.getLogger("jaxdiff")
  if not logger.handlers:
    handler = py_logging.StreamHandler(sys.stderr)
    handler.setFormatter(py_logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
  logger.setLevel(py_logging.INFO)
  logger.propagate = False


def define_distributed_flags() -> None:
  """The multi-host flags of run_train.py and run_sample.py (call once, at import)."""
  flags.DEFINE_enum(
      "distributed", None, ["off", "auto", "explicit"],
      "How processes find each other. 'auto': jax.distributed.initialize() detects Cloud TPU "
      "(pod slices), SLURM (srun) or Open MPI (mpirun); 'explicit': --coordinator_address, "
      "--num_processes and --process_id; 'off': one process. Default: 'explicit' when "
      "--coordinator_address is given, else 'off'.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host; the same on all).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host; the same on all).")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) (multi-host).")
  flags.DEFINE_float("distributed_timeout", 300.0, "Seconds to wait for the coordinator and the other "
                     "processes before failing with an error (multi-host).")


def initialize_distributed_from_flags() -> None:
  """Calls `sharding.initialize_distributed` as the flags of `define_distributed_flags` say."""
  from jaxdiff import sharding
  from jaxdiff.errors import ConfigError

  f = flags.FLAGS
  explicit = {"coordinator_address": f.coordinator_address, "num_processes": f.num_processes,
              "process_id": f.process_id}
  mode = f.distributed or ("explicit" if f.coordinator_address is not None else "off")
  if mode == "off":
    given = [k for k, v in explicit.items() if v is not None]
    if given:
      raise ConfigError(f"--{given[0]} is set but --distributed=off; drop it, or use --distributed=explicit "
                        f"(with --coordinator_address, --num_processes, --process_id) or --distributed=auto.")
    return
  sharding.initialize_distributed(**explicit, auto=(mode == "auto"), timeout_s=f.distributed_timeout)


# tcmalloc, opt-in with JAXDIFF_TCMALLOC=1. XLA:CPU maps each step's temporary buffer (1.2 GB
# for the DDPM U-Net train steps) fresh from the OS and unmaps it afterwards, because glibc
# serves allocations that large with mmap and cannot be told to keep them, so every step
# page-faults its whole working set in again. tcmalloc keeps freed spans for reuse: the small
# train step on 2 CPU cores ran 1.88 -> 1.62 s. The price is memory: in some runs a second
# step-sized span stays resident (big train peak RSS 2.2 -> 3.3 GB), with asynchronous
# dispatch and, less often, without it (JAX_CPU_ENABLE_ASYNC_DISPATCH=false: 1 of 4 small
# train runs), so it is not the default (benchmarks/RESULTS.md); with glibc,
# `config.training.steps_per_call` > 1 gets most of the speed (one mapping per call). tcmalloc
# has to be preloaded before the process starts, so the entry scripts restart themselves once
# with it when asked and it is installed (`apt-get install libtcmalloc-minimal4`). TPU VM
# images preload tcmalloc for the same reason.
TCMALLOC = ("tcmalloc_minimal", "tcmalloc")


def tcmalloc_env(environ=None, find_library=None) -> dict | None:
  """`environ` with tcmalloc added to LD_PRELOAD, or None (JAXDIFF_TCMALLOC is not 1, not
  Linux, not installed, or already preloaded)."""
  import ctypes.util
  import os

  environ = dict(os.environ if environ is None else environ)
  find_library = find_library or ctypes.util.find_library
  if (not sys.platform.startswith("linux") or environ.get("JAXDIFF_TCMALLOC", "0") != "1"
      or "tcmalloc" in environ.get("LD_PRELOAD", "")):
    return None
  lib = next((path for path in map(find_library, TCMALLOC) if path), None)
  if lib is None:
    return None
  environ["LD_PRELOAD"] = " ".join(filter(None, [environ.get("LD_PRELOAD", ""), lib]))
  # tcmalloc prints a line for every allocation above 1 GiB by default; a train step makes one
  environ.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
  return environ


def restart_with_tcmalloc() -> None:
  """Re-executes this script with tcmalloc preloaded if JAXDIFF_TCMALLOC=1 and it is installed
  (see `tcmalloc_env`); returns otherwise."""
  import os

  env = tcmalloc_env()
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # interpreter flags kept

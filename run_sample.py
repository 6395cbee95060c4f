r"""Draws samples from a trained model's EMA parameters; writes a PNG grid and an .npz.

  python run_sample.py --workdir runs/quickstart --sampler ddim --steps 50 --num_samples 64
  python run_sample.py --workdir runs/quickstart --sampler ddpm --steps 1000 --step 2000

With --mode=likelihood it evaluates bits/dim on the test split instead and writes
<workdir>/eval/likelihood_<method>_step<step>.json:

  python run_sample.py --workdir runs/quickstart --mode likelihood --likelihood_method ode
  python run_sample.py --workdir runs/quickstart --mode likelihood --likelihood_method vlb --vlb_timesteps 50

With --mode=fid it draws --num_samples samples and writes their FID against the training data
and their Inception Score to <workdir>/eval/fid_<method>_<nfe>nfe_step<step>_seed<seed>.json (jaxdiff.fid; pytorch-fid's
Inception weights, read without torch; the data's statistics are saved for --fid_ref):

  python run_sample.py --workdir runs/cifar10 --mode fid --num_samples 50000 --sampler ddim --steps 100 \
      --inception pt_inception-2015-12-05-6726825d.pth [--fid_metrics kid,prdc] [--fid_steps all] [--fid_watch 300]

Class-conditional models (configs/mnist_cond.py) draw the --labels given (cycled over
--num_samples; default every class in turn, 'null' = unconditional) with classifier-free
guidance scale w; any model can be steered by a noise-conditional classifier
(configs/mnist_classifier.py):

  python run_sample.py --workdir runs/mnist_cond --labels 0,1,2 --guidance_scale 3.0
  python run_sample.py --workdir runs/mnist --labels 7 --classifier_workdir runs/mnist_clf \
      --classifier_scale 2.0

With --task it runs a controlled-generation task on --input (PNG, .npy or .npz; any
--sampler) and writes input / mask / output side by side to <workdir>/tasks/ (jaxdiff.tasks):

  python run_sample.py --workdir runs/mnist --task inpaint --input digit.png --mask mask.png
  python run_sample.py --workdir runs/mnist --task outpaint --input small_digit.png
  python run_sample.py --workdir runs/cifar10 --task colorize --input gray.png
  python run_sample.py --workdir runs/mnist --task sdedit --input sketch.png --strength 0.5
  python run_sample.py --workdir runs/mnist_superres --task superres --input low_res_14x14.png
  python run_sample.py --workdir runs/mnist_latent --task sdedit --input digits.npz --strength 0.5 \
      --labels 3 --guidance_scale 3     # img2img in a latent model, towards the class 3

The config is read from <workdir>/config.json unless --config is given.
"""

from absl import app, flags
from ml_collections import config_flags

from jaxdiff import cli, errors, evaluate, fid, generate, samplers, tasks

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
                           "<workdir>/eval; --task: <workdir>/tasks).")
_LABELS = flags.DEFINE_list("labels", None, "Class labels to draw, cycled over --num_samples (class-conditional "
                            "models: default all classes; 'null' = unconditional; with a classifier: the "
                            "classes to guide towards; with --task: cycled over the inputs, default null).")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance w: cond + w (cond - uncond); "
                               "0 = conditional only (default: config.sampling.guidance_scale).")
_CLF_WORKDIR = flags.DEFINE_string("classifier_workdir", None, "Run directory of a noise-conditional classifier "
                                   "(config.model.name='classifier') for classifier guidance.")
_CLF_SCALE = flags.DEFINE_float("classifier_scale", None, "Classifier guidance scale (default 1.0).")
_MODE = flags.DEFINE_enum("mode", "sample", ["sample", "likelihood", "fid"], "Draw samples, evaluate bits/dim, "
                          "or the FID and Inception Score of --num_samples samples (jaxdiff.fid).")
_INCEPTION = flags.DEFINE_string("inception", None, "--mode=fid: pytorch-fid's Inception weights, "
                                 "pt_inception-2015-12-05-6726825d.pth (read without torch).")
_FID_REF = flags.DEFINE_string("fid_ref", None, "--mode=fid: the data's statistics (.npz with mu, sigma) from an "
                               "earlier run or pytorch-fid (default: computed from the data and saved).")
_FID_SPLIT = flags.DEFINE_string("fid_split", None, "--mode=fid: the data split the statistics come from (default: "
                                 "config.data.split; --num_examples caps it).")
_FID_METRICS = flags.DEFINE_list("fid_metrics", [], "--mode=fid: metrics besides FID and the Inception Score: "
                                "kid (Kernel Inception Distance), prdc (precision, recall, density, coverage). "
                                "They need the data's features: saved as fid_stats_*_feats.npz for --fid_ref.")
_FID_STEPS = flags.DEFINE_list("fid_steps", None, "--mode=fid: score each of these checkpoint steps ('all': every "
                              "one the run kept) with the same samples' seed and reference, and write the curve "
                              "(fid_curve_*.json); instead of --step.")
_FID_WATCH = flags.DEFINE_float("fid_watch", 0.0, "--mode=fid: an evaluation job beside training: score every "
                               "checkpoint and each new one as it is written, looking every this many seconds, "
                               "until the run's last step (implies --fid_steps=all).")
_FID_WATCH_TIMEOUT = flags.DEFINE_float("fid_watch_timeout", 6 * 3600.0, "--mode=fid --fid_watch: stop when no new "
                                        "checkpoint has appeared for this many seconds (nor, without --config, the "
                                        "run's config.json: the job may start before training).")
_LMETHOD = flags.DEFINE_enum("likelihood_method", "ode", ["ode", "vlb"],
                             "Probability-flow ODE, or the DDPM variational bound.")
_NUM_EX = flags.DEFINE_integer("num_examples", None, "Test examples to evaluate (default: the whole split).")
_RTOL = flags.DEFINE_float("rtol", 1e-5, "Likelihood ODE relative tolerance.")
_ATOL = flags.DEFINE_float("atol", 1e-5, "Likelihood ODE absolute tolerance.")
_REPEATS = flags.DEFINE_integer("n_repeats", 1, "Dequantization draws averaged per image (ODE).")
_VLB_T = flags.DEFINE_integer("vlb_timesteps", None, "Timesteps sampled per image for the bound "
                              "(default: all of them).")
_TASK = flags.DEFINE_enum("task", None, list(tasks.TASKS), "Controlled generation from --input instead of "
                          "sampling: inpaint (--mask), outpaint, colorize, sdedit (--strength), superres.")
_INPUT = flags.DEFINE_string("input", None, "--task input: a PNG/JPEG, .npy or .npz (key 'images') of images; "
                             "uint8 pixels or floats in [0, 1].")
_MASK = flags.DEFINE_string("mask", None, "--task=inpaint mask of the input's size: white/1 = keep, black/0 = "
                            "generate.")
_INVERT = flags.DEFINE_bool("invert_mask", False, "Swap the mask's meaning (white = generate).")
_STRENGTH = flags.DEFINE_float("strength", None, "--task=sdedit strength in (0, 1]: the input is noised to "
                               "t0 = strength * T (default 0.5; 1 = sample from scratch).")
_CONVERT = flags.DEFINE_bool("convert_channels", False, "Allow a grey input for an RGB model (repeated) or an "
                             "RGB input where grey is needed (channel mean).")
_CONDITIONING = flags.DEFINE_enum("conditioning", "replace", list(tasks.CONDITIONINGS),
                                  "inpaint/outpaint/colorize: 'replace' (score_sde replacement) or 'tweedie' "
                                  "(moment-projected conditional score; exact for Gaussian data, costlier).")
_CG_STEPS = flags.DEFINE_integer("cg_steps", 5, "Conjugate-gradient iterations per score with "
                                 "--conditioning=tweedie.")
_RESAMPLE = flags.DEFINE_integer("resample", 1, "inpaint/outpaint/colorize: RePaint's resampling, times each "
                                 "--jump_length-th step is redone after noising back up (1: none; 10 in the paper).")
_JUMP = flags.DEFINE_integer("jump_length", 1, "Grid steps each RePaint jump goes back up (10 in the paper).")
_OBS_NOISE = flags.DEFINE_float("obs_noise", 0.0, "With --conditioning=tweedie: the known values are noisy, with "
                                "this standard deviation in model units (pixels in [-1, 1]; a latent model's "
                                "latents); they are then generated too (0: kept exactly).")
cli.define_distributed_flags()  # --distributed, --coordinator_address, ... as in run_train.py
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.setup_logging()
  with errors.one_line_errors():
    cli.initialize_distributed_from_flags()
    fid_only = [f"--{f.name}" for f in (_INCEPTION, _FID_REF, _FID_SPLIT, _FID_METRICS, _FID_STEPS, _FID_WATCH,
                                        _FID_WATCH_TIMEOUT) if f.present]
    if fid_only and _MODE.value != "fid":
      one = len(fid_only) == 1
      raise errors.InputError(f"{', '.join(fid_only)} {'is' if one else 'are'} for --mode=fid only (here "
                              f"--mode={_MODE.value}); add --mode=fid or drop {'it' if one else 'them'}.")
    if not _CONFIG.value and _MODE.value == "fid" and _FID_WATCH.value > 0:  # training may not have started yet
      config = fid.wait_for_run_config(_WORKDIR.value, poll_s=_FID_WATCH.value, timeout_s=_FID_WATCH_TIMEOUT.value)
    else:
      config = _CONFIG.value or generate.load_config(_WORKDIR.value)
    if _MODE.value == "likelihood":
      evaluate.evaluate_likelihood(config, _WORKDIR.value, step=_STEP.value, num_examples=_NUM_EX.value,
                                   batch_size=_BATCH.value, method=_LMETHOD.value, seed=_SEED.value,
                                   n_repeats=_REPEATS.value, rtol=_RTOL.value, atol=_ATOL.value,
                                   vlb_timesteps=_VLB_T.value, out_dir=_OUT.value)
      return
    if _MODE.value == "fid":
      if not _INCEPTION.value:
        raise errors.InputError("--mode=fid needs --inception=PATH, pytorch-fid's weights: download https://github."
                                "com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-"
                                "6726825d.pth")
      kw = dict(inception_path=_INCEPTION.value, ref=_FID_REF.value, split=_FID_SPLIT.value, num_ref=_NUM_EX.value,
                num_samples=_NUM.value, out_dir=_OUT.value, metrics=_FID_METRICS.value, method=_SAMPLER.value,
                num_steps=_STEPS.value, seed=_SEED.value, batch_size=_BATCH.value,
                options=cli.parse_options(_OPTS.value), labels=_LABELS.value, guidance_scale=_GUIDANCE.value,
                classifier_workdir=_CLF_WORKDIR.value, classifier_scale=_CLF_SCALE.value)
      steps = _FID_STEPS.value or (["all"] if _FID_WATCH.value else None)
      if steps is None:
        fid.evaluate_fid(config, _WORKDIR.value, step=_STEP.value, **kw)
        return
      if _STEP.value is not None:
        raise errors.InputError(f"--step={_STEP.value} and --fid_steps={','.join(steps)}"
                                f"{' (--fid_watch)' if not _FID_STEPS.value else ''} both pick checkpoints; give one.")
      fid.evaluate_fid_steps(config, _WORKDIR.value, steps=steps, watch_s=_FID_WATCH.value,
                             watch_timeout_s=_FID_WATCH_TIMEOUT.value, **kw)
      return
    if _TASK.value is not None:
      if _CLF_WORKDIR.value or _CLF_SCALE.value is not None:
        raise errors.InputError(f"--task={_TASK.value} does not take classifier guidance (--classifier_workdir, "
                                f"--classifier_scale); a class-conditional model takes --labels and "
                                f"--guidance_scale.")
      tasks.run_task(config, _WORKDIR.value, task=_TASK.value, input_path=_INPUT.value, mask_path=_MASK.value,
                     invert_mask=_INVERT.value, strength=_STRENGTH.value, convert_channels=_CONVERT.value,
                     conditioning=_CONDITIONING.value, cg_steps=_CG_STEPS.value, resample=_RESAMPLE.value,
                     jump_length=_JUMP.value, obs_noise=_OBS_NOISE.value, step=_STEP.value,
                     method=_SAMPLER.value, num_steps=_STEPS.value, options=cli.parse_options(_OPTS.value),
                     seed=_SEED.value, batch_size=_BATCH.value, out_dir=_OUT.value, labels=_LABELS.value,
                     guidance_scale=_GUIDANCE.value)
      return
    generate.generate(config, _WORKDIR.value, step=_STEP.value, method=_SAMPLER.value,
                      num_steps=_STEPS.value, num_samples=_NUM.value, seed=_SEED.value,
                      batch_size=_BATCH.value, options=cli.parse_options(_OPTS.value),
                      out_dir=_OUT.value, labels=_LABELS.value, guidance_scale=_GUIDANCE.value,
                      classifier_workdir=_CLF_WORKDIR.value, classifier_scale=_CLF_SCALE.value)


if __name__ == "__main__":
  cli.restart_with_tcmalloc()  # JAXDIFF_TCMALLOC=1: faster CPU steps, more memory (jaxdiff/cli.py)
  app.run(main, flags_parser=cli.parse_flags_one_line)

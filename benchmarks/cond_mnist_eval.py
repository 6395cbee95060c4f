r"""Class-conditional MNIST: how often samples show the requested digit, with and without CFG.

  python run_train.py --config configs/mnist_cond.py:runlocal --workdir runs/mnist_cond
  python run_train.py --config configs/mnist_classifier.py:clean --workdir runs/mnist_clf_clean
  python benchmarks/cond_mnist_eval.py --workdir runs/mnist_cond \
      --classifier_workdir runs/mnist_clf_clean --num_samples 100 --guidance_scales 0,3

For each guidance scale w it draws `--num_samples` images from the class-conditional model
(`generate.make_sampler`, the sampler and steps of `--sampler`/`--steps`), asking for the
digits 0..9 in turn, and classifies them with the project's clean MNIST classifier (a
`NoiseClassifier` trained on clean images, evaluated at t_min). It also draws the same
number with the null label (the unconditional model inside the same network), scored
against the same requested digits: the chance baseline (~10%). The classifier's own
accuracy on `--num_test` MNIST test images is reported alongside, so the sample accuracies
can be read against it.

Prints one JSON object: `classifier_test_accuracy`, and per setting the `accuracy`
(fraction of samples classified as the requested digit), its binomial standard error,
the per-digit accuracies, the sampler's network evaluations (`nfe`) and `classifier_fd`:
the Frechet distance between the samples' and the `--num_test` test images' pooled
classifier features (FID's formula with the MNIST classifier in Inception's place;
`evaluate.frechet_distance`; `test_halves_fd`, the distance between the even and odd test
images, is the floor at that sample size). Accuracy alone rewards blurry class means (a one-step
sampler's x0 estimate is classified perfectly); the distance also sees sharpness and
diversity. In the same features: `classifier_kid` (`fid.kernel_inception_distance`, unbiased
at small N) and `classifier_prdc`, precision, recall, density and coverage
(`fid.precision_recall`): precision is how many samples lie on the test digits' manifold,
recall how much of it the samples cover (guidance trades the second for the first).

With `--img2img_strengths 0.3,0.5` it also edits the first `--num_samples` test digits
towards the next digit, (y + 1) mod 10, with SDEdit at each strength and guidance scale
(`tasks.sdedit_images`; a latent model edits in its latents: img2img), and reports under
`img2img` how many edits the classifier reads as the target and how many as the original.

With `--inpaint_rows 14` it hides the bottom half of those test digits, inpaints it
(`tasks.inpaint_images`; a latent model in its latents) with the null label and with each
guidance scale towards the true digit, and reports under `inpaint` how many results the
classifier reads as the original digit, next to the masked input's rate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxdiff import data as data_lib  # noqa: E402
from jaxdiff import evaluate, fid, generate, guidance, latent, parameterization, sharding, tasks, train  # noqa: E402


def load(workdir: str, mesh):
  """(config, experiment, EMA params) of a training run."""
  config = generate.load_config(workdir)
  exp = train.build_experiment(config)
  _, params = evaluate.restore_ema_params(config, workdir, exp, mesh)
  return config, exp, params


def make_classify(clf_exp):
  """A jitted `fn(params, x [B, ...]) -> (predicted class [B], pooled features [B, d])` of a classifier
  at t = t_min."""
  process = clf_exp.process

  def fn(params, x):
    t = jnp.full((x.shape[0],), process.t_min, jnp.float32)
    xin, c = guidance.classifier_input(process, x, t)
    logits, aux = clf_exp.model.apply({"params": params}, xin, c, train=False, mutable=["intermediates"])
    return jnp.argmax(logits, axis=-1), aux["intermediates"]["features"][0]

  return jax.jit(fn)


def in_batches(fn, params, x: np.ndarray, batch_size: int, mesh):
  """`fn(params, xb)` over `x` in batches of `batch_size` on the mesh (the last padded with zeros),
  gathered to the host: `fn`'s output tree with each array `[len(x), ...]`."""
  outs = []
  for lo in range(0, len(x), batch_size):
    xb = x[lo:lo + batch_size]
    n = len(xb)
    if n < batch_size:
      xb = np.concatenate([xb, np.zeros((batch_size - n,) + xb.shape[1:], xb.dtype)])
    out = fn(params, jax.device_put(xb, sharding.batch_sharding(mesh, xb.ndim)))
    outs.append(jax.tree.map(lambda a: sharding.to_host(a)[:n], out))
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


def classify(fn, params, x: np.ndarray, batch_size: int, mesh) -> tuple[np.ndarray, np.ndarray]:
  """Predicted classes and classifier features of `x`, in batches (the last one padded)."""
  return in_batches(fn, params, x, batch_size, mesh)


def test_images(config, num: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `num` images of a run's test split (scaled as in training) and their labels."""
  kw = data_lib.dataset_kwargs(config.data)
  kw.update(split=f"{config.data.eval_split}[:{num}]", use_labels=True, random_flip=False,
            uniform_dequantization=False)
  it = data_lib.create_dataset(**kw, batch_size=batch_size, num_epochs=1, shuffle=False, drop_remainder=False)
  x, y = zip(*[(b["x"], b["label"]) for b in it])
  return np.concatenate(x), np.concatenate(y)


def test_accuracy(clf_config, fn, params, num_test: int, batch_size: int, mesh) -> tuple[float, np.ndarray]:
  """The classifier's accuracy on the first `num_test` images of the test split, and their features
  (the reference set of the Frechet distance)."""
  x, y = test_images(clf_config, num_test, batch_size)
  pred, feats = classify(fn, params, x, batch_size, mesh)
  return float(np.mean(pred == y)), feats


def make_edit(exp, config, *, guidance_scale: float, method, num_steps, strength: float | None = None,
              mask: np.ndarray | None = None, inpaint_kw: dict | None = None):
  """Jitted `fn(params, vae_params, key, x, labels) -> edited x` towards `labels`: img2img at `strength`
  (`tasks.sdedit_images`), or with `mask` inpainting (`tasks.inpaint_images` with `inpaint_kw`:
  conditioning, resample, jump_length, obs_noise)."""
  method = generate.resolve_method(method or config.sampling.method)
  kw = dict(method=method, num_steps=int(num_steps or config.sampling.num_steps),
            denoise=bool(config.sampling.denoise), **generate.sampler_options(config, method))
  clip = exp.data_range if config.sampling.clip_denoised else None  # None for latents (unbounded)

  def fn(params, vae_params, key, x, labels):
    score_fn = generate.model_score_fn(exp, params, labels=labels, guidance_scale=guidance_scale)
    if mask is not None:  # clipped after the conditioning (tasks.inpaint's clip_range)
      return tasks.inpaint_images(key, exp, score_fn, x, mask, vae_params=vae_params, clip_range=clip,
                                  **(inpaint_kw or {}), **kw)[0]
    if clip is not None:
      score_fn = parameterization.clip_denoised(score_fn, exp.process, *clip)
    return tasks.sdedit_images(key, exp, score_fn, x, strength, vae_params=vae_params, **kw)[0]

  return jax.jit(fn)


def edit_all(fn, params, vae_params, x: np.ndarray, labels: np.ndarray, *, batch_size: int, mesh,
             seed: int) -> np.ndarray:
  """`fn` over `x` in batches of `batch_size` (the last padded), towards `labels`."""
  edited = []
  for b, lo in enumerate(range(0, len(x), batch_size)):
    xb, tb = x[lo:lo + batch_size], labels[lo:lo + batch_size]
    pad = batch_size - len(xb)
    if pad:
      xb, tb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)]), np.concatenate([tb, np.repeat(tb[-1:], pad)])
    xb, tb = (jax.device_put(a, sharding.batch_sharding(mesh, a.ndim)) for a in (xb, tb))
    e = fn(params, vae_params, jax.random.fold_in(jax.random.key(seed), b), xb, tb)
    edited.append(sharding.to_host(e)[:batch_size - pad])
  return np.concatenate(edited)


def img2img(exp, config, params, classify_fn, clf_params, mesh, *, strengths, guidance_scales, num: int,
            batch_size: int, method, num_steps, seed: int) -> dict:
  """SDEdit of the first `num` test digits towards (y + 1) mod K: the fraction read as the target / original."""
  k = exp.num_classes
  x, y = test_images(config, num, batch_size)
  target = ((y + 1) % k).astype(np.int32)
  vae_params = None if exp.latent is None else latent.load_params(exp.latent, mesh)
  out = {}
  for strength in strengths:
    for w in guidance_scales:
      t0 = time.time()
      fn = make_edit(exp, config, strength=strength, guidance_scale=w, method=method, num_steps=num_steps)
      edited = edit_all(fn, params, vae_params, x, target, batch_size=batch_size, mesh=mesh, seed=seed)
      pred, _ = classify(classify_fn, clf_params, edited, batch_size, mesh)
      out[f"s{strength:g}_w{w:g}"] = {"strength": strength, "guidance_scale": w, "n": int(num),
                                      "to_target": float(np.mean(pred == target)),
                                      "kept_original": float(np.mean(pred == y)),
                                      "wall_s": round(time.time() - t0, 1)}
  return out


def inpaint_eval(exp, config, params, classify_fn, clf_params, mesh, *, guidance_scales, num: int, batch_size: int,
                 method, num_steps, seed: int, keep_rows: int, inpaint_kw: dict | None = None) -> dict:
  """Hides all but the top `keep_rows` rows of the first `num` test digits and fills the rest
  (`tasks.inpaint_images`; a latent model in its latents): the fraction the classifier reads as
  the original digit for the masked input (the hole filled with the known pixels' mean), the
  null label (the unconditional model) and each guidance scale towards the true digit. `inpaint_kw`:
  `tasks.inpaint`'s conditioning, resample, jump_length and obs_noise."""
  k = exp.num_classes
  x, y = test_images(config, num, batch_size)
  y = y.astype(np.int32)
  mask = np.zeros((1,) + x.shape[1:], np.float32)
  mask[:, :keep_rows] = 1.0
  vae_params = None if exp.latent is None else latent.load_params(exp.latent, mesh)
  masked = np.asarray(tasks.fill_unknown(jnp.asarray(x), jnp.asarray(mask)))
  pred, _ = classify(classify_fn, clf_params, masked, batch_size, mesh)
  out = {"keep_rows": keep_rows, **(inpaint_kw or {}), "n": int(num), "masked_input": float(np.mean(pred == y))}
  for name, w, labels in [("null", 0.0, np.full_like(y, k))] + [(f"w{w:g}", float(w), y) for w in guidance_scales]:
    t0 = time.time()
    fn = make_edit(exp, config, guidance_scale=w, method=method, num_steps=num_steps, mask=mask,
                   inpaint_kw=inpaint_kw)
    filled = edit_all(fn, params, vae_params, x, labels, batch_size=batch_size, mesh=mesh, seed=seed)
    pred, _ = classify(classify_fn, clf_params, filled, batch_size, mesh)
    out[name] = {"guidance_scale": w, "original": float(np.mean(pred == y)), "wall_s": round(time.time() - t0, 1)}
  return out


def summarize(pred: np.ndarray, want: np.ndarray, num_classes: int) -> dict:
  acc = float(np.mean(pred == want))
  per = [float(np.mean(pred[want == k] == k)) if np.any(want == k) else None for k in range(num_classes)]
  return {"accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / len(pred)), "per_class": per,
          "n": int(len(pred))}


def run(workdir: str, classifier_workdir: str, *, guidance_scales=(0.0, 3.0), num_samples: int = 100,
        method: str | None = None, num_steps: int | None = None, batch_size: int = 100, num_test: int = 1000,
        seed: int = 0, img2img_strengths=(), inpaint_rows: int = 0, inpaint_conditioning: str = "replace",
        inpaint_resample: tuple[int, int] = (1, 1), inpaint_obs_noise: float = 0.0) -> dict:
  """The evaluation as a dict (what the script prints)."""
  mesh = sharding.create_mesh({"data": -1})
  batch_size = sharding.round_up_batch(min(batch_size, num_samples), mesh)
  config, exp, params = load(workdir, mesh)
  clf_config, clf_exp, clf_params = load(classifier_workdir, mesh)
  k = exp.num_classes
  if not k:
    raise SystemExit(f"error: {workdir} holds an unconditional model (config.model.num_classes=0).")
  if not clf_exp.is_classifier or clf_exp.num_classes != k or clf_exp.data_spec.shape != exp.data_spec.shape:
    raise SystemExit(f"error: {classifier_workdir} is not a {k}-class classifier of {exp.data_spec.shape} images.")
  decode = latent.sample_decoder(exp.latent, mesh)  # latent diffusion models' samples are decoded
  classify_fn = make_classify(clf_exp)
  test_acc, test_feats = test_accuracy(clf_config, classify_fn, clf_params, num_test, batch_size, mesh)
  result = {"workdir": workdir, "classifier_workdir": classifier_workdir, "num_samples": num_samples,
            "method": generate.resolve_method(method or config.sampling.method),
            "num_steps": int(num_steps or config.sampling.num_steps),
            "classifier_test_accuracy": test_acc,
            # the floor: two halves of the test images (distances shrink with more samples)
            "test_halves_fd": evaluate.frechet_distance(test_feats[0::2], test_feats[1::2]),
            "settings": {}}
  n_batches = int(math.ceil(num_samples / batch_size))
  want = generate.cycle_labels(range(k), n_batches * batch_size)
  settings = [(f"cfg_w{w:g}", float(w), want) for w in guidance_scales]
  settings.append(("unconditional", 0.0, np.full_like(want, k)))  # the null label: chance baseline
  for name, w, labels in settings:
    t0 = time.time()
    fn = generate.make_sampler(exp, config, batch_size=batch_size, mesh=mesh, method=method,
                               num_steps=num_steps, guidance_scale=w)
    xs = []
    for b in range(n_batches):
      y = jax.device_put(labels[b * batch_size:(b + 1) * batch_size], sharding.batch_sharding(mesh, 1))
      x, nfe = fn(params, jax.random.fold_in(jax.random.key(seed), b), y)
      xs.append(sharding.to_host(decode(x)))
    x = np.concatenate(xs)[:num_samples]
    pred, feats = classify(classify_fn, clf_params, x, batch_size, mesh)
    result["settings"][name] = {"guidance_scale": w, "nfe": int(nfe), **summarize(pred, want[:num_samples], k),
                                "classifier_fd": evaluate.frechet_distance(feats, test_feats),
                                "classifier_kid": fid.kernel_inception_distance(test_feats, feats, seed=seed)[0],
                                "classifier_prdc": fid.precision_recall(test_feats, feats),
                                "wall_s": round(time.time() - t0, 1)}
  if img2img_strengths:
    result["img2img"] = img2img(exp, config, params, classify_fn, clf_params, mesh, strengths=img2img_strengths,
                                guidance_scales=guidance_scales, num=num_samples, batch_size=batch_size,
                                method=method, num_steps=num_steps, seed=seed)
  if inpaint_rows:
    result["inpaint"] = inpaint_eval(exp, config, params, classify_fn, clf_params, mesh,
                                     guidance_scales=guidance_scales, num=num_samples, batch_size=batch_size,
                                     method=method, num_steps=num_steps, seed=seed, keep_rows=inpaint_rows,
                                     inpaint_kw=dict(conditioning=inpaint_conditioning, resample=inpaint_resample[0],
                                                     jump_length=inpaint_resample[1], obs_noise=inpaint_obs_noise))
  return result


def print_result(result: dict, out: str | None) -> None:
  """Prints the result as JSON, and writes it to `out` too when given."""
  text = json.dumps(result, indent=1)
  print(text)
  if out:
    with open(out, "w") as f:
      f.write(text + "\n")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="class-conditional model run (configs/mnist_cond.py)")
  ap.add_argument("--classifier_workdir", required=True, help="clean classifier run (mnist_classifier.py:clean)")
  ap.add_argument("--guidance_scales", default="0,3", help="comma-separated CFG scales w")
  ap.add_argument("--num_samples", type=int, default=100, help="samples per setting (digits 0..9 in turn)")
  ap.add_argument("--sampler", default=None, help="sampling method (default: the run's config)")
  ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's config)")
  ap.add_argument("--batch_size", type=int, default=100)
  ap.add_argument("--num_test", type=int, default=1000, help="test images to measure the classifier on")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=None, help="also write the JSON here")
  ap.add_argument("--img2img_strengths", default="", help="comma-separated SDEdit strengths: also edit test "
                  "digits towards the next digit (img2img)")
  ap.add_argument("--inpaint_rows", type=int, default=0, help="also hide all but the top N rows of test digits "
                  "and inpaint them (e.g. 14: the bottom half)")
  ap.add_argument("--inpaint_conditioning", default="replace", choices=tasks.CONDITIONINGS,
                  help="how the inpainting conditions on the known rows (tasks.inpaint)")
  ap.add_argument("--inpaint_resample", default="1,1", help="RePaint's resample,jump_length for the inpainting "
                  "(e.g. 5,1; 1,1: none)")
  ap.add_argument("--inpaint_obs_noise", type=float, default=0.0, help="with --inpaint_conditioning tweedie: the "
                  "known values' noise standard deviation (a latent model's: in latent units)")
  a = ap.parse_args()
  result = run(a.workdir, a.classifier_workdir, guidance_scales=[float(w) for w in a.guidance_scales.split(",")],
               num_samples=a.num_samples, method=a.sampler, num_steps=a.steps, batch_size=a.batch_size,
               num_test=a.num_test, seed=a.seed,
               img2img_strengths=[float(s) for s in a.img2img_strengths.split(",") if s], inpaint_rows=a.inpaint_rows,
               inpaint_conditioning=a.inpaint_conditioning,
               inpaint_resample=tuple(int(v) for v in a.inpaint_resample.split(",")),
               inpaint_obs_noise=a.inpaint_obs_noise)
  print_result(result, a.out)


if __name__ == "__main__":
  main()

r"""How well an autoencoder run reconstructs held-out images: PSNR, L1 and, with a classifier, rFD.

  python run_train.py --config configs/mnist_autoencoder.py --workdir runs/mnist_autoencoder
  python run_train.py --config configs/mnist_classifier.py:clean --workdir runs/mnist_clf_clean
  python benchmarks/autoencoder_eval.py --workdir runs/mnist_autoencoder \
      --classifier_workdir runs/mnist_clf_clean --num_test 2000

It encodes the first `--num_test` images of the run's test split to their posterior means,
decodes them (`latent.measure_statistics`, as latent diffusion's decoder sees them), and
reports the mean PSNR (each image against its reconstruction, in [-1, 1]: peak-to-peak 2) and
the mean absolute error per pixel. With `--classifier_workdir` (the project's clean MNIST
classifier) it also reports how often the reconstructions keep their digit (`accuracy`, next to
the originals' `test_accuracy`) and the autoencoders' rFID in those features: the Frechet
distance between the reconstructions' and the originals' pooled classifier features
(`classifier_rfd`; Inception's features where this is CIFAR or ImageNet, the number LDM reports
for its autoencoders) with its floor `test_halves_fd` (even vs odd originals), and KID. PSNR
rewards the blur an L1 autoencoder settles for; the distance sees sharpness, which is what
LDM's perceptual and adversarial terms are for. With `--lpips_weights` it also reports the
mean LPIPS at the images' own size.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cond_mnist_eval import classify, in_batches, load, make_classify, print_result, test_images  # noqa: E402
from jaxdiff import evaluate, fid, latent, sharding  # noqa: E402


def reconstruct(exp, params, x: np.ndarray, batch_size: int, mesh) -> np.ndarray:
  """The autoencoder's reconstructions of `x` from the posterior means, in batches (the last padded)."""
  fn = jax.jit(lambda p, xb: latent.measure_statistics(exp.model, p, xb, jax.random.key(0))["reconstruction"])
  return in_batches(fn, params, x, batch_size, mesh)


def run(workdir: str, *, classifier_workdir: str = "", lpips_weights: str = "", num_test: int = 1000,
        batch_size: int = 100, seed: int = 0) -> dict:
  """The evaluation as a dict (what the script prints)."""
  mesh = sharding.create_mesh({"data": -1})
  batch_size = sharding.round_up_batch(min(batch_size, num_test), mesh)
  config, exp, params = load(workdir, mesh)
  if not exp.is_autoencoder:
    raise SystemExit(f"error: {workdir} holds a {type(exp.model).__name__}, not an autoencoder "
                     f"(config.model.name='autoencoder', e.g. configs/mnist_autoencoder.py).")
  t0 = time.time()
  x, y = test_images(config, num_test, batch_size)
  recon = reconstruct(exp, params, x, batch_size, mesh)
  err = (recon - x).reshape(len(x), -1)
  psnr = 10.0 * np.log10(4.0 / np.maximum(np.mean(err ** 2, axis=1), 1e-12))  # peak-to-peak 2 in [-1, 1]
  loss = config.loss
  result = {"workdir": workdir, "num_test": len(x), "psnr_db": float(np.mean(psnr)), "l1": float(np.mean(np.abs(err))),
            "objective": {"reconstruction": loss.reconstruction, "kl_weight": float(loss.kl_weight),
                          "perceptual_weight": float(loss.perceptual_weight),
                          "disc_weight": float(loss.disc_weight), "disc_start": int(loss.disc_start)}}
  if classifier_workdir:
    _, clf_exp, clf_params = load(classifier_workdir, mesh)
    if not clf_exp.is_classifier or clf_exp.data_spec.shape != exp.data_spec.shape:
      raise SystemExit(f"error: {classifier_workdir} is not a classifier of {exp.data_spec.shape} images.")
    classify_fn = make_classify(clf_exp)
    pred_x, feats_x = classify(classify_fn, clf_params, x, batch_size, mesh)
    pred_r, feats_r = classify(classify_fn, clf_params, recon, batch_size, mesh)
    result.update(test_accuracy=float(np.mean(pred_x == y)), accuracy=float(np.mean(pred_r == y)),
                  classifier_rfd=evaluate.frechet_distance(feats_r, feats_x),
                  test_halves_fd=evaluate.frechet_distance(feats_x[0::2], feats_x[1::2]),
                  classifier_kid=fid.kernel_inception_distance(feats_x, feats_r, seed=seed)[0])
  if lpips_weights:
    from jaxdiff.models import lpips

    lp = lpips.load_lpips(*[p.strip() for p in lpips_weights.split(",") if p.strip()])
    dist = jax.jit(lambda p, pairs: lpips.lpips_distance(p, pairs[:, 0], pairs[:, 1], resolution=None))
    result["lpips"] = float(np.mean(in_batches(dist, lp, np.stack([recon, x], 1), batch_size, mesh)))
  result["wall_s"] = round(time.time() - t0, 1)
  return result


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="autoencoder run (configs/mnist_autoencoder.py)")
  ap.add_argument("--classifier_workdir", default="", help="clean classifier run (mnist_classifier.py:clean): "
                  "also the reconstructions' accuracy, rFD and KID in its features")
  ap.add_argument("--lpips_weights", default="", help="also the mean LPIPS (config.lpips.weights' files)")
  ap.add_argument("--num_test", type=int, default=1000, help="test images to reconstruct")
  ap.add_argument("--batch_size", type=int, default=100)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=None, help="also write the JSON here")
  a = ap.parse_args()
  result = run(a.workdir, classifier_workdir=a.classifier_workdir, lpips_weights=a.lpips_weights,
               num_test=a.num_test, batch_size=a.batch_size, seed=a.seed)
  print_result(result, a.out)


if __name__ == "__main__":
  main()

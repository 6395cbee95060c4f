r"""The KL autoencoder of latent diffusion (Rombach et al. 2022) on MNIST: 28 x 28 x 1 -> 7 x 7 x 4.

  python run_train.py --config configs/mnist_autoencoder.py --workdir runs/mnist_autoencoder
  python run_train.py --config configs/mnist_latent.py --workdir runs/mnist_latent \
      --config.latent.autoencoder=jaxdiff:runs/mnist_autoencoder

`jaxdiff.models.AutoencoderKL` (diffusers' layout) with three levels of widths 32, 64, 64 and
one resnet block each (4x downsampling, 4 latent channels: 196 latent numbers per 784-pixel
image), trained on the mean L1 reconstruction error + 1e-6 x KL / pixels (LDM's KL weight,
`losses.make_autoencoder_loss`; LDM's perceptual and adversarial terms are the options
`config.loss.perceptual_weight` and `disc_weight`, which did not help on MNIST: the README's
"The autoencoder's perceptual and adversarial terms" has the measurement). Every sample
point and the end of the run write `reconstructions_<step>.png` (input | reconstruction
pairs) and `latent_stats.json`: the PSNR of the last batch's reconstructions and the mean and
std of its posterior samples, from which latent diffusion runs take their `scaling_factor`
(1/std) and `shift_factor` (the mean), as LDM's `scale_by_std` does.

MEASURED 2026-11-25 on the 2-core CPU: 1200 steps of batch 32 in 5m24s wall, reconstruction
PSNR 27.5 dB, latents' std 2.26; the latent DiT trained in it reaches 86% class accuracy with
guidance w=3 (configs/mnist_latent.py's docstring has the whole measurement).
`benchmarks/autoencoder_eval.py` on 2000 test digits: PSNR 28.4 dB, L1 0.028, 97.3% of the
reconstructions classified as their digit (the originals: 97.3%).

Variant `:tiny`: a few steps of a very small autoencoder, for the test suite (plumbing only).
"""

from jaxdiff.configs import base_config, model_section


def get_config(arg=None):
  c = base_config()
  c.data.update(dataset="mnist", data_dir="../shared/tfds", resolution=28, num_channels=1, centered=True)
  c.model = model_section("autoencoder", in_channels=1, out_channels=1, latent_channels=4,
                          block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8)
  c.loss.update(reconstruction="l1", kl_weight=1e-6)
  c.optimizer.update(learning_rate=1e-3, warmup_steps=100, grad_clip=1.0)
  c.training.update(batch_size=32, num_steps=1200, ema_decay=0.99, log_every=100, checkpoint_every=400,
                    sample_every=0, num_final_samples=32)
  if arg == "tiny":
    c.data.update(split="train[:512]", num_threads=1)
    c.model.update(block_out_channels=(8, 8), norm_num_groups=4, mid_attention=False)
    c.training.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=4, keep_checkpoints=1,
                      ema_decay=0.9, num_final_samples=8)
  elif arg is not None:
    raise ValueError(f"configs/mnist_autoencoder.py has the variant ':tiny', not {arg!r}.")
  return c

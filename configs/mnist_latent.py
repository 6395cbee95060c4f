r"""Latent diffusion on MNIST: a class-conditional DiT in configs/mnist_autoencoder.py's latents.

  python run_train.py --config configs/mnist_autoencoder.py --workdir runs/mnist_autoencoder
  python run_train.py --config configs/mnist_latent.py --workdir runs/mnist_latent \
      --config.latent.autoencoder=jaxdiff:runs/mnist_autoencoder
  python run_sample.py --workdir runs/mnist_latent --labels 0,1,2 --guidance_scale 3.0

The frozen autoencoder encodes each batch to 7 x 7 x 4 latents on the devices
(`config.latent`, `jaxdiff.latent`), scaled to unit variance by the statistics its run
measured; a DiT with 1 x 1 patches (49 tokens, as configs/mnist_dit.py:runlocal's 4 x 4 pixel
patches), width 128, 4 blocks, 4 heads, runs the linear-schedule DDPM on them with eps
prediction and label dropout 0.1 for classifier-free guidance; samples are decoded to images
before they are written. A published autoencoder works the same way:
--config.latent.autoencoder=diffusers:/path/to/sd-vae-ft-ema (RGB data, resolution a
multiple of 8).

MEASURED 2026-11-25 on the project's shared 2-core CPU (1 device), both commands above:
configs/mnist_autoencoder.py, 953,413 parameters, 1200 steps of batch 32 in 5m24s wall (~4
steps/s, 0.94 GB peak RSS): mean L1 error 0.26 (step 100) -> 0.047 (1200), reconstruction PSNR
27.5 dB on the last batch, latents' std 2.26 (scaling_factor 0.442). Then this config, 1,272,324
parameters, 3000 steps in 6m37s wall (~7.7 steps/s, as the pixel DiT's 7.2: the encoder adds
little; 0.85 GB): eps-MSE 0.138 (step 300) -> 0.109 (1000) -> 0.095 (2000) -> 0.088 (3000).
With configs/mnist_classifier.py:clean retrained (97.0% on the 10,000 test images), 500
samples per setting (DDIM 25), the fraction labelled as the requested digit, +- binomial
standard error (benchmarks/cond_mnist_eval.py, as in configs/mnist_dit.py):

  unconditional (null label) 7.0% +- 1.1 (chance: 10%)
  w=0 43.6% +- 2.2, w=1 73.2% +- 2.0, w=3 86.2% +- 1.5
  (mnist_dit.py:runlocal, the same DiT on 4 x 4 pixel patches: w=0 14.4%, w=1 18.4%, w=3 30.6%;
   mnist_cond.py:runlocal, the U-Net: 30.2%, 53.4%, 75.2%)

So the same 49-token DiT and steps do far better in the latents than on pixel patches, and
better than the U-Net, for 12 CPU minutes in all (the autoencoder's 5.4 included) against 7.5.
The 5s are the weakest class (32% at w=3), then the 9s and 8s.

img2img (SDEdit in the latents, `run_sample.py --task sdedit --labels ... --guidance_scale ...`):
the first 200 test digits edited towards the next digit, (y + 1) mod 10, DDIM 25, the
fraction the classifier reads as the target / as the original digit:

  python benchmarks/cond_mnist_eval.py --workdir runs/mnist_latent \
      --classifier_workdir runs/mnist_clf_clean --num_samples 200 --guidance_scales 0,3 \
      --num_test 10000 --img2img_strengths 0.3,0.5,0.7

  strength 0.3: w=0 9% / 66%, w=3 41% / 22%
  strength 0.5: w=0 23% / 18%, w=3 83% / 2.5%
  strength 0.7: w=0 36% / 7%,  w=3 88% / 0%

Inpainting in the latents (`run_sample.py --task inpaint`, `tasks.inpaint_images`; measured
2026-11-25): the bottom half of the first 200 test digits hidden (the latent cells of rows
12-27) and filled, DDIM 25, the fraction read as the original digit (38.5% of the masked
inputs), with `--inpaint_rows 14` (and `--inpaint_conditioning tweedie`) added to the command
above: replacement null label 43.5%, true label w=0 74.0%, w=3 91.5%; with RePaint's resampling
(`--inpaint_resample 5,1`, 121 NFE) 39.0%, 84.0%, 97.0%; Tweedie 47.5%, 53.0%, 58.5% (the
README compares the pixel U-Net's 38.0%, 92.5%, 99.5%).

Variant `:tiny`: a few steps of a very small DiT, for the test suite (plumbing only); the
test sets config.latent.autoencoder to a `configs/mnist_autoencoder.py:tiny` run.
"""

from jaxdiff.configs import base_config, model_section


def get_config(arg=None):
  c = base_config()
  c.data.update(dataset="mnist", data_dir="../shared/tfds", resolution=28, num_channels=1, centered=True,
                use_labels=True)
  c.latent.update(autoencoder="jaxdiff:runs/mnist_autoencoder", sample_posterior=True)
  c.model = model_section("dit", patch_size=1, hidden_size=128, depth=4, num_heads=4, num_classes=10)
  c.optimizer.update(learning_rate=1e-3, warmup_steps=50, grad_clip=1.0)
  c.training.update(batch_size=32, num_steps=3000, ema_decay=0.99, log_every=50, checkpoint_every=500,
                    sample_every=0, num_final_samples=50, label_dropout=0.1)
  c.sampling.update(method="ddim", num_steps=25, batch_size=50, guidance_scale=3.0)
  if arg == "tiny":
    c.data.update(split="train[:512]", num_threads=1)
    c.model.update(hidden_size=16, depth=1, num_heads=2)
    c.process.num_timesteps = 100
    c.optimizer.update(warmup_steps=2)
    c.training.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=4, keep_checkpoints=1,
                      ema_decay=0.9, num_final_samples=8)
    c.sampling.update(num_steps=4, batch_size=8)
  elif arg is not None:
    raise ValueError(f"configs/mnist_latent.py has the variant ':tiny', not {arg!r}.")
  return c

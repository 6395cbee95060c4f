r"""Class-conditional DDPM on MNIST with classifier-free guidance (Ho & Salimans 2022).

  python run_train.py --config configs/mnist_cond.py --workdir runs/mnist_cond \
      --config.data.data_dir=../shared/tfds
  python run_sample.py --workdir runs/mnist_cond --labels 0,1,2 --guidance_scale 3.0

U-Net ch=64, ch_mult (1,2,2) (28 -> 14 -> 7), 2 res blocks, attention at 14x14, dropout 0.1,
a label embedding (10 classes + the null label) added to the time embedding; labels are
dropped to the null label with probability 0.1 in training (config.training.label_dropout),
so one network is both the conditional and the unconditional model that guidance needs.
Linear DDPM schedule, T=1000; Adam 2e-4, warmup 1000, EMA 0.9999, batch 128, 60k steps.
Expected result: not run on this project's machines (no GPU time); see `:runlocal`.

Variant `:runlocal`: a narrow network (ch=16, no attention but the mid block's, 268k
parameters), 600 steps of batch 32 at lr 2e-3, EMA 0.99; DDIM with 25 steps. MEASURED on
the project's shared 2-core CPU (1 device), with a clean MNIST classifier trained by the
project (configs/mnist_classifier.py:clean, 96.9% on the 10,000 test images):

  python run_train.py --config configs/mnist_cond.py:runlocal --workdir runs/mnist_cond   # 7m13s
  python run_train.py --config configs/mnist_classifier.py:clean --workdir runs/mnist_clf_clean
  python benchmarks/cond_mnist_eval.py --workdir runs/mnist_cond \
      --classifier_workdir runs/mnist_clf_clean --num_samples 500 --guidance_scales 0,1,3 --num_test 10000

  fraction of samples (digits 0..9 requested in turn) the classifier labels as the
  requested digit, +- binomial standard error:
    500 per setting: unconditional (null label) 8.0% +- 1.2 (chance: 10%)
                     w=0 30.2% +- 2.1, w=1 53.4% +- 2.2, w=3 75.2% +- 1.9
    100 per setting (--num_samples 100 --guidance_scales 0,3; classifier 97.3% on 1000
                     test images): unconditional 7%, w=0 27% +- 4.4, w=3 80% +- 4.0
  The loss was 0.032 at step 600 (eps-MSE); the digits are rough after 600 CPU steps,
  guidance makes the requested class clearly more often recognisable.

Variant `:tiny`: a few steps of a very small network, for the test suite (plumbing only).
"""

from jaxdiff.configs import base_config


def get_config(arg=None):
  c = base_config()
  c.data.update(dataset="mnist", data_dir="", resolution=28, num_channels=1, centered=True,
                use_labels=True)
  c.model.dtype = "auto"  # mixed precision: bfloat16 compute on GPU/TPU, float32 on CPU; fp32 params
  c.model.update(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14,), dropout=0.1,
                 num_groups=32, num_classes=10)
  c.optimizer.update(learning_rate=2e-4, warmup_steps=1000, grad_clip=1.0)
  c.training.update(batch_size=128, num_steps=60_000, ema_decay=0.9999, log_every=100,
                    checkpoint_every=5000, sample_every=10_000, num_final_samples=100,
                    label_dropout=0.1)
  c.sampling.update(method="ddim", num_steps=100, batch_size=100, guidance_scale=3.0)
  if arg == "runlocal":
    # Sized for ~6 minutes on 2 shared CPU cores (0.5 s/step): 28x28 kept, narrow network.
    c.data.data_dir = "../shared/tfds"
    c.model.update(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), num_groups=8,
                   dropout=0.0)
    c.optimizer.update(learning_rate=2e-3, warmup_steps=50)
    c.training.update(batch_size=32, num_steps=600, ema_decay=0.99, log_every=50, checkpoint_every=300,
                      sample_every=0, num_final_samples=50)
    c.sampling.update(num_steps=25, batch_size=50)
  elif arg == "tiny":
    c.data.update(data_dir="../shared/tfds", split="train[:512]", num_threads=1)
    c.model.update(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4, dropout=0.0)
    c.process.num_timesteps = 100
    c.optimizer.update(learning_rate=1e-3, warmup_steps=2)
    c.training.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=4, keep_checkpoints=1,
                      ema_decay=0.9, num_final_samples=8)
    c.sampling.update(num_steps=4, batch_size=8)
  elif arg is not None:
    raise ValueError(f"configs/mnist_cond.py has variants ':runlocal' and ':tiny', not {arg!r}.")
  return c

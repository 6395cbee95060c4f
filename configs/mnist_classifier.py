r"""MNIST classifiers: noise-conditional (classifier guidance) and clean (evaluating samples).

  python run_train.py --config configs/mnist_classifier.py --workdir runs/mnist_clf
  python run_sample.py --workdir runs/mnist --labels 0,1,2 \
      --classifier_workdir runs/mnist_clf --classifier_scale 2.0

  python run_train.py --config configs/mnist_classifier.py:clean --workdir runs/mnist_clf_clean

The network is the U-Net's downsampling half (ch=16, ch_mult (1,2,2), 1 res block per
level, attention in the 7x7 mid block) + pooling + a dense layer (`jaxdiff.models.NoiseClassifier`),
trained with cross-entropy on x_t at the DDPM process's random t (the process must be the
diffusion model's: the classifier guides its x_t). Its time embedding makes it a
classifier of every noise level.

`:clean` trains the same network on clean images only (t = t_min), to measure how often
samples show the requested digit. A separate network, not the noise-conditional one at
t_min: a classifier used for guidance is what the guided samples were optimised against,
so scoring them with it would be circular (adversarial directions raise its accuracy
without making better digits), and a clean-only classifier spends all of its training on
the regime it is evaluated in. MEASURED (`:clean`, 300 steps of batch 64, 1m45s on the shared
2-core CPU): 96.9% accuracy on the 10,000 MNIST test images (benchmarks/cond_mnist_eval.py
reports it as classifier_test_accuracy). The noise-conditional default (600 steps) was only
run in its `:tiny` form here (tests/test_conditional.py); its guidance is checked against an
exact mixture posterior in tests/test_guidance.py.

Variant `:tiny`: a few steps on 512 images for the test suite.
"""

from jaxdiff.configs import base_config


def get_config(arg=None):
  c = base_config()
  c.data.update(dataset="mnist", data_dir="../shared/tfds", resolution=28, num_channels=1, centered=True,
                use_labels=True)
  c.model.update(name="classifier", num_classes=10, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
                 attn_resolutions=(), dropout=0.0, num_groups=8)
  c.loss.t_sampling = "process"
  c.optimizer.update(learning_rate=2e-3, warmup_steps=50, grad_clip=1.0)
  c.training.update(batch_size=64, num_steps=600, ema_decay=0.99, log_every=50, checkpoint_every=300,
                    num_final_samples=0)
  variants = set((arg or "").split(",")) - {""}
  if "clean" in variants:
    c.loss.t_sampling = "clean"
    c.training.num_steps = 300
  if "tiny" in variants:
    c.data.update(split="train[:512]", num_threads=1)
    c.model.update(ch=8, ch_mult=(1,), attn_resolutions=(), num_groups=4)
    c.process.num_timesteps = 100
    c.training.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=4, keep_checkpoints=1)
  unknown = variants - {"clean", "tiny"}
  if unknown:
    raise ValueError(f"configs/mnist_classifier.py has variants 'clean' and 'tiny', not {sorted(unknown)}.")
  return c

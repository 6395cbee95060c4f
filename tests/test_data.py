"""Data pipeline: MNIST from TFDS array_record, host slices, exact resume, device prefetch, errors."""

from __future__ import annotations

import collections
import gzip
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, load_config
from jaxdiff import checkpoint as ckpt_lib
from jaxdiff import configs as config_lib
from jaxdiff import data as data_lib
from jaxdiff import sharding
from jaxdiff.data import catalog, tfds_sources
from jaxdiff.errors import ConfigError, DataError

RAW_MNIST = os.path.abspath(os.path.join(ROOT, "..", "shared", "data", "mnist"))


def mnist(tfds_dir, **kw):
  args = dict(dataset="mnist", data_dir=tfds_dir, batch_size=64, resolution=28, num_channels=1,
              num_threads=2)
  args.update(kw)
  return data_lib.create_dataset(**args)


def take(it, n):
  return [jax.tree.map(np.asarray, next(it)) for _ in range(n)]


def to_host(batch):
  return {k: sharding.to_host(v) for k, v in batch.items()}


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def record_keys(batches):
  """Each record as (uint8 image bytes, label): identifies it across iterators."""
  out = []
  for b in batches:
    imgs = np.round(np.asarray(b["x"]) * 255).astype(np.uint8)
    out += [(im.tobytes(), int(lab)) for im, lab in zip(imgs, b["label"])]
  return out


# ------------------------------------------------------------------------------------
# MNIST from ../shared/tfds
# ------------------------------------------------------------------------------------


def test_mnist_shapes_dtypes_range_and_labels(tfds_dir):
  it = mnist(tfds_dir, batch_size=256, use_labels=True)
  batches = take(it, 12)
  x = np.concatenate([b["x"] for b in batches])
  y = np.concatenate([b["label"] for b in batches])
  assert batches[0]["x"].shape == (256, 28, 28, 1) and batches[0]["x"].dtype == np.float32
  assert batches[0]["label"].shape == (256,) and batches[0]["label"].dtype == np.int32
  assert x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_allclose((x + 1) * 127.5, np.round((x + 1) * 127.5), atol=1e-4)  # 256 levels
  assert 0.10 < (x > 0).mean() < 0.25  # mostly black background, some ink
  freq = np.bincount(y, minlength=10) / len(y)
  assert set(np.unique(y)) == set(range(10))
  assert np.all((freq > 0.07) & (freq < 0.13)), freq  # MNIST classes are 9-11% each

  # [0, 1] with uniform dequantization: continuous values in [0, 1)
  x01 = next(mnist(tfds_dir, centered=False, uniform_dequantization=True))["x"]
  assert x01.min() >= 0.0 and x01.max() < 1.0
  frac = (x01 * 256) % 1
  assert 0.4 < frac.mean() < 0.6 and np.std(frac) > 0.2


def test_tfds_centre_crop(tfds_dir):
  kw = dict(split="test[:64]", batch_size=64, shuffle=False, num_epochs=1)
  full = next(mnist(tfds_dir, **kw))["x"]
  crop = next(mnist(tfds_dir, resolution=14, crop_size=14, **kw))["x"]
  assert crop.shape == (64, 14, 14, 1)
  np.testing.assert_array_equal(crop, full[:, 7:21, 7:21])


def _raw_idx(name):
  with gzip.open(os.path.join(RAW_MNIST, name)) as f:
    buf = f.read()
  if "images" in name:
    return np.frombuffer(buf, np.uint8, offset=16).reshape(-1, 28, 28)
  return np.frombuffer(buf, np.uint8, offset=8)


def test_mnist_pixels_and_labels_match_the_raw_idx_files(tfds_dir):
  if not os.path.isdir(RAW_MNIST):
    pytest.skip(f"raw MNIST idx files not found at {RAW_MNIST}")
  raw_x, raw_y = _raw_idx("t10k-images-idx3-ubyte.gz"), _raw_idx("t10k-labels-idx1-ubyte.gz")
  labels_of = collections.defaultdict(set)
  for im, lab in zip(raw_x, raw_y):
    labels_of[im.tobytes()].add(int(lab))
  it = mnist(tfds_dir, split="test[:512]", batch_size=128, centered=False, use_labels=True,
             shuffle=False, num_epochs=1)
  recs = record_keys(list(it))
  assert len(recs) == 512
  for img, lab in recs:
    assert lab in labels_of[img]  # every decoded image is a test image, with its label


_NO_TF_SCRIPT = """
import importlib.abc, importlib.machinery, json, sys

# Pretend TensorFlow is installed (find_spec succeeds), and record any real import of it.
IMPORTED = []


class _Loader(importlib.abc.Loader):
  def create_module(self, spec):
    return None

  def exec_module(self, module):
    IMPORTED.append(module.__name__)
    raise ImportError("tensorflow must not be imported on the training path")


class _Finder(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == "tensorflow" or name.startswith("tensorflow."):
      return importlib.machinery.ModuleSpec(name, _Loader())
    return None


sys.meta_path.insert(0, _Finder())
import jaxdiff.train, jaxdiff.checkpoint, jaxdiff.generate
from jaxdiff import data, sharding
it = data.create_dataset(dataset="mnist", data_dir=TFDS_DIR, batch_size=16, resolution=28,
                         num_channels=1, use_labels=True, num_threads=1)
assert next(it)["x"].shape == (16, 28, 28, 1)
it = data.prefetch_to_device(it, sharding.create_mesh({"data": -1}), size=2)
assert next(it)["x"].shape == (16, 28, 28, 1)
it.close()
print(json.dumps({"imported": IMPORTED, "in_modules": "tensorflow" in sys.modules,
                  "tfds": "tensorflow_datasets" in sys.modules}))
"""


def test_no_tensorflow_import_in_the_training_data_path(tfds_dir, tmp_path):
  # A fresh interpreter in which `tensorflow` looks installed: building and drawing from an
  # MNIST iterator (and importing the training code) must not import it.
  script = f"TFDS_DIR = {tfds_dir!r}\n" + _NO_TF_SCRIPT
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=180)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result == {"imported": [], "in_modules": False, "tfds": True}  # TFDS read it, without TF


def test_tfds_data_dir_from_environment(tfds_dir, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", tfds_dir)
  b = next(mnist(None, batch_size=8))
  assert b["x"].shape == (8, 28, 28, 1)


# ------------------------------------------------------------------------------------
# Host slices
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_hosts_read_disjoint_and_jointly_complete_slices(tfds_dir, shuffle):
  split, n = "test[:1000]", 1000
  src = tfds_sources.open_source("mnist", split, tfds_dir)
  everything = collections.Counter((np.asarray(r["image"]).tobytes(), int(r["label"]))
                                   for r in src.__getitems__(list(range(n))))
  slices = []
  for i in range(2):
    it = mnist(tfds_dir, split=split, batch_size=100, centered=False, use_labels=True, shuffle=shuffle,
               num_epochs=1, drop_remainder=False, shard_index=i, shard_count=2, seed=3)
    slices.append(collections.Counter(record_keys(list(it))))
  assert sum(slices[0].values()) == sum(slices[1].values()) == n // 2
  assert len(everything) == n  # these 1000 test images are all distinct
  assert slices[0] + slices[1] == everything  # jointly complete: every record exactly once
  assert not set(slices[0]) & set(slices[1])  # disjoint


def test_shuffle_changes_every_epoch_and_hosts_differ(tfds_dir):
  it = mnist(tfds_dir, split="test[:256]", batch_size=128, use_labels=True, seed=1)
  e1, e2 = record_keys(take(it, 2)), record_keys(take(it, 2))
  assert sorted(e1) == sorted(e2) and e1 != e2  # same records, new order
  h0 = record_keys(take(mnist(tfds_dir, split="test[:256]", batch_size=64, use_labels=True,
                              shard_index=0, shard_count=2), 1))
  h1 = record_keys(take(mnist(tfds_dir, split="test[:256]", batch_size=64, use_labels=True,
                              shard_index=1, shard_count=2), 1))
  assert not set(h0) & set(h1)


# ------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------


def _dummy_state():
  return {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(7, jnp.int32)}


def _save(directory, step, it):
  ck = ckpt_lib.Checkpointer(directory, async_save=False)
  ck.save(step, _dummy_state(), data_iterator=it, meta={"what": "test"})
  ck.close()


def _restore(directory, it):
  ck = ckpt_lib.Checkpointer(directory, async_save=False)
  step, state = ck.restore(jax.tree.map(jnp.zeros_like, _dummy_state()), data_iterator=it)
  ck.close()
  np.testing.assert_array_equal(state["w"], _dummy_state()["w"])
  return step


def test_resume_from_checkpoint_sees_the_same_batches(tfds_dir, tmp_path):
  # 300 records in batches of 64: the 8 batches cross an epoch boundary (reshuffle)
  make = lambda: mnist(tfds_dir, split="test[:300]", batch_size=64, use_labels=True, random_flip=True,
                       uniform_dequantization=True, seed=5)
  k, m = 3, 5
  full = take(make(), k + m)
  it = make()
  assert_same_batches(take(it, k), full[:k])
  _save(str(tmp_path), k, it)
  take(it, 2)  # the run goes on (and is then killed)
  fresh = make()
  assert _restore(str(tmp_path), fresh) == k
  assert_same_batches(take(fresh, m), full[k:])


def _wait_until_full(it, timeout=30.0):
  t = time.time()
  while it.buffered < it.size:
    assert time.time() - t < timeout, "the prefetch thread never filled its queue"
    time.sleep(0.01)


def test_resume_through_device_prefetch(tfds_dir, tmp_path):
  mesh = sharding.create_mesh({"data": -1})
  assert sharding.num_data_shards(mesh) == 8
  make = lambda: mnist(tfds_dir, split="test[:300]", batch_size=32, use_labels=True, random_flip=True,
                       seed=2)
  k, m = 4, 6
  full = take(make(), k + m)
  it = data_lib.prefetch_to_device(make(), mesh, size=3)
  first = [next(it) for _ in range(k)]
  assert isinstance(first[0]["x"], jax.Array) and first[0]["x"].shape == (32, 28, 28, 1)
  assert len(first[0]["x"].sharding.device_set) == 8
  assert_same_batches([to_host(b) for b in first], full[:k])
  _wait_until_full(it)  # batches k+1..k+3 are read ahead: the saved position must still be k
  _save(str(tmp_path / "a"), k, it)
  it.close()

  resumed = data_lib.prefetch_to_device(make(), mesh, size=3)
  assert _restore(str(tmp_path / "a"), resumed) == k
  assert_same_batches([to_host(next(resumed)) for _ in range(m)], full[k:])
  resumed.close()

  # the checkpoint holds grain's own JSON state: it restores into a bare iterator too
  bare = make()
  _restore(str(tmp_path / "a"), bare)
  assert_same_batches(take(bare, m), full[k:])


def test_prefetch_get_and_set_state_roundtrip(tfds_dir):
  it = data_lib.prefetch_to_device(mnist(tfds_dir, split="test[:200]", batch_size=16, seed=4),
                                   size=4, to_device=lambda b: b)
  take(it, 3)
  _wait_until_full(it)
  state = it.get_state()
  assert isinstance(state, bytes) and json.loads(state)
  after = take(it, 5)
  it.set_state(state)
  assert_same_batches(take(it, 5), after)
  it.close()


# ------------------------------------------------------------------------------------
# Prefetch to device
# ------------------------------------------------------------------------------------


class _SlowIterator:
  """Counts batches; each takes `delay` seconds to produce."""

  def __init__(self, delay, fail_at=None):
    self.i, self.delay, self.fail_at = 0, delay, fail_at

  def __next__(self):
    if self.i == self.fail_at:
      raise DataError("broken record")
    time.sleep(self.delay)
    self.i += 1
    return {"x": np.full((8, 2), self.i, np.float32)}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = s["i"]


def test_prefetch_overlaps_input_with_compute():
  n, delay = 12, 0.05
  t = time.perf_counter()
  it = data_lib.prefetch_to_device(_SlowIterator(delay), size=2, to_device=lambda b: b)
  for _ in range(n):
    next(it)
    time.sleep(delay)  # the "train step"
  overlapped = time.perf_counter() - t
  it.close()
  assert overlapped < 0.8 * 2 * n * delay, overlapped  # serial would take 2 * n * delay
  sync = data_lib.prefetch_to_device(_SlowIterator(0.0), size=0, to_device=lambda b: b)
  assert [int(next(sync)["x"][0, 0]) for _ in range(3)] == [1, 2, 3]
  assert json.loads(sync.get_state()) == {"i": 3}


def test_prefetch_yields_global_arrays_in_order_and_reraises_errors():
  mesh = sharding.create_mesh({"data": -1})
  it = data_lib.prefetch_to_device(_SlowIterator(0.0, fail_at=5), mesh, size=2)
  got = [next(it) for _ in range(5)]
  assert [int(sharding.to_host(b["x"])[0, 0]) for b in got] == [1, 2, 3, 4, 5]
  assert got[0]["x"].sharding.spec == sharding.batch_sharding(mesh, 2).spec
  with pytest.raises(DataError, match="broken record"):
    next(it)
  assert json.loads(it.get_state()) == {"i": 5}  # positioned before the batch that failed
  with pytest.raises(DataError):
    next(it)
  it.close()


# ------------------------------------------------------------------------------------
# Embedded datasets through the same interface
# ------------------------------------------------------------------------------------


def test_embedded_datasets_through_the_same_interface():
  b = next(data_lib.create_dataset(dataset="shapes", batch_size=8, resolution=8, num_examples=64,
                                   use_labels=True, num_threads=1))
  assert b["x"].shape == (8, 8, 8, 3) and set(np.unique(b["label"])) <= {0, 1, 2}
  g = next(data_lib.create_dataset(dataset="gmm2d", batch_size=16, num_examples=64, num_threads=1))
  assert g["x"].shape == (16, 2) and g["x"].dtype == np.float32


def test_batches_are_read_whole_and_state_counts_records(tfds_dir):
  """Non-folder sources are batched before grain's reader threads (one prefetched element per
  batch, not per record); the saved position still counts records, as earlier versions' did."""
  it = mnist(tfds_dir, split="test[:300]", batch_size=16, seed=3)
  take(it, 3)
  assert it.get_state() == {"next_index": 48}
  after = take(it, 2)
  again = mnist(tfds_dir, split="test[:300]", batch_size=16, seed=3)
  again.set_state({"next_index": 48})  # a record-level pipeline's state after 3 batches
  assert_same_batches(take(again, 2), after)
  with pytest.raises(DataError, match=r"next_index=40 is not a multiple of batch_size=16"):
    again.set_state({"next_index": 40})
  # Cheap records are not throttled by the reader: grain 0.2.18 walked its whole ready
  # buffer (4 batches of records) for every record, 900 records/s for this on 2 cores;
  # batched first it reads ~11,000/s. The bound leaves room for a loaded CI machine.
  fast = data_lib.create_dataset(dataset="gmm2d", batch_size=256, num_examples=20000, num_threads=2)
  take(fast, 2)
  start, n = time.perf_counter(), 0
  while time.perf_counter() - start < 1.0:
    next(fast)
    n += 1
  rate = n * 256 / (time.perf_counter() - start)
  assert rate > 2500, f"gmm2d read at {rate:.0f} records/s"


# ------------------------------------------------------------------------------------
# Specs, config validation and bad input
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,classes,channels", [
    ("mnist", 10, 1), ("fashion_mnist", 10, 1), ("cifar10", 10, 3), ("celeb_a", 0, 3),
    ("lsun/church_outdoor", 0, 3), ("downsampled_imagenet/64x64", 0, 3),
    ("imagenet_resized/32x32", 1000, 3), ("shapes", 3, 3), ("folder", 0, 3)])
def test_spec_for_every_kind_of_dataset(name, classes, channels):
  s = data_lib.spec(name, 32, channels)
  assert s == data_lib.DataSpec((32, 32, channels), classes, True)
  assert data_lib.spec("gmm2d", 32, 3) == data_lib.DataSpec((2,), 8, False)


def test_unknown_dataset_lists_the_known_ones():
  with pytest.raises(DataError, match=r"'cifar100' is not known; known datasets: .*mnist.*cifar10.*"
                                      r"celeb_a.*folder.*lsun/<category>"):
    data_lib.create_dataset(dataset="cifar100", batch_size=4)
  with pytest.raises(DataError, match=r"LSUN has no category 'churches'.*lsun/church_outdoor"):
    data_lib.spec("lsun/churches", 64, 3)


def test_unprepared_or_missing_tfds_data_says_how_to_prepare(tfds_dir, tmp_path):
  with pytest.raises(DataError, match=r"'cifar10' is not prepared under .*shared/tfds.*pip install "
                                      r"'jaxdiff\[prepare\]' && tfds build cifar10 --data_dir=.* "
                                      r"--file_format=array_record"):
    data_lib.create_dataset(dataset="cifar10", data_dir=tfds_dir, batch_size=4)
  with pytest.raises(DataError, match=r"data_dir='.*nowhere' does not exist.*tfds build mnist"):
    mnist(str(tmp_path / "nowhere"))
  v = tmp_path / "tfrec" / "lsun" / "bedroom" / "3.1.0"
  v.mkdir(parents=True)
  (v / "dataset_info.json").write_text(json.dumps({"name": "lsun", "fileFormat": "tfrecord"}))
  with pytest.raises(DataError, match=r"prepared as tfrecord.*tfds convert_format --dataset_version_dir="
                                      r".*--out_file_format=array_record"):
    data_lib.create_dataset(dataset="lsun/bedroom", data_dir=str(tmp_path / "tfrec"), batch_size=4,
                            resolution=64)
  with pytest.raises(DataError, match=r"split='validation' does not exist .*\['test', 'train'\]"):
    mnist(tfds_dir, split="validation")


def test_wrong_channels_and_missing_labels_are_data_errors(tfds_dir):
  with pytest.raises(DataError, match=r"'mnist' has 1-channel images but config.data.num_channels=3; "
                                      r"set --config.data.num_channels=1"):
    mnist(tfds_dir, num_channels=3)
  with pytest.raises(DataError, match=r"use_labels=True but dataset 'celeb_a' has no labels"):
    data_lib.create_dataset(dataset="celeb_a", batch_size=4, resolution=64, use_labels=True)
  with pytest.raises(DataError, match=r"needs the image folder"):
    data_lib.create_dataset(dataset="folder", batch_size=4)


def _cfg(**data):
  c = config_lib.base_config()
  c.data.update(data)
  return c


@pytest.mark.parametrize("data,model,error,match", [
    (dict(dataset="cifar10", resolution=64), dict(ch_mult=(1, 2, 2, 2), attn_resolutions=(16,)),
     ConfigError, r"resolution=64 is larger than the 'cifar10' images \(32 px\).*upsampled"),
    (dict(dataset="downsampled_imagenet/32x32", resolution=64), dict(attn_resolutions=(16,)),
     ConfigError, r"resolution=64 is larger"),
    (dict(dataset="celeb_a", resolution=64, crop_size=200), dict(attn_resolutions=(16,)),
     ConfigError, r"crop_size=200 is larger than the 'celeb_a' images \(218x178\)"),
    (dict(dataset="celeb_a", resolution=64, crop_size=32), dict(attn_resolutions=(16,)),
     ConfigError, r"resolution=64 is larger than config.data.crop_size=32"),
    (dict(dataset="folder", data_dir="/x", resolution=20), dict(ch_mult=(1, 2, 2, 2), attn_resolutions=()),
     ConfigError, r"resolution=20 cannot pass through the U-Net's 4 levels"),
    (dict(dataset="folder", resolution=32), dict(attn_resolutions=(16,)),
     ConfigError, r"dataset='folder' reads images from config.data.data_dir, which is empty"),
    (dict(dataset="mnist", resolution=28, num_channels=3), dict(attn_resolutions=(14,)),
     ConfigError, r"num_channels=3 but 'mnist' images have 1"),
    (dict(dataset="lsun/bedroom", resolution=64, split="test"), dict(attn_resolutions=(16,)),
     ConfigError, r"split='test' is not a split of 'lsun/bedroom'; its splits are train, validation"),
    (dict(dataset="celeb_a", resolution=64, use_labels=True), dict(attn_resolutions=(16,)),
     ConfigError, r"use_labels=True but 'celeb_a' has no labels"),
    (dict(dataset="imagenet64"), dict(), DataError, r"'imagenet64' is not known; known datasets"),
    (dict(dataset="mnist", resolution=28, num_channels=1, num_threads=-1), dict(attn_resolutions=(14,)),
     ConfigError, r"num_threads=-1 must be >= 0"),
])
def test_config_validation_of_the_data_section(data, model, error, match):
  c = _cfg(**data)
  c.model.update(model)
  with pytest.raises(error, match=match):
    config_lib.validate(c)


def test_valid_data_configs_pass(tmp_path):
  ok = [dict(dataset="lsun/church_outdoor", resolution=64, split="train"),
        dict(dataset="celeb_a", resolution=64, crop_size=140, split="train[:90%]"),
        dict(dataset="downsampled_imagenet/64x64", resolution=64, split="validation"),
        dict(dataset="folder", data_dir=str(tmp_path), resolution=64, use_labels=True)]
  for data in ok:
    c = _cfg(**data)
    c.model.update(ch_mult=(1, 2, 2, 2), attn_resolutions=(16,))
    config_lib.validate(c)
  for name in ("quickstart", "mnist_ddpm", "cifar10_ddpm", "tiny"):
    config_lib.validate(load_config(name))
  c = load_config("folder_ddpm")
  c.data.data_dir = str(tmp_path)
  config_lib.validate(c)
  assert catalog.lookup("lsun/tower").splits == ("train", "validation")


def test_reflow_pairs_stay_paired_split_over_hosts_and_resume(tmp_path):
  """data.pairs: rows written in chunks come back whole (noise with its x and label) through the
  shuffle, the hosts' rows of each global batch and a restored iterator state; a directory
  without pairs.json is not taken for pairs."""
  from jaxdiff.data import pairs as pairs_lib

  n, shape = 30, (2, 2, 1)
  x = np.arange(n * 4, dtype=np.float32).reshape(n, *shape)

  def chunk(i):  # rows i..i+7 (the last chunk runs past num_pairs)
    rows = np.arange(i, i + 8) % n
    return {"x": x[rows], "noise": -x[rows], "label": (rows % 7).astype(np.int32)}

  writer = pairs_lib.PairsWriter(str(tmp_path / "p"), num_pairs=n, shape=shape, labels=True)
  assert pairs_lib.read_meta(str(tmp_path / "p")) is None  # nothing visible before close
  for i in range(0, n + 8, 8):
    writer.add(chunk(i))
  writer.close({"teacher": "t"})
  assert pairs_lib.read_meta(str(tmp_path / "p")) == {"teacher": "t", "num_pairs": n}
  assert sorted(os.listdir(tmp_path / "p")) == ["label.npy", "noise.npy", "pairs.json", "x.npy"]
  assert not (tmp_path / "p.partial").exists()

  # a writer stopped after two chunks: the same writer again continues after them, to the same pairs
  made = {"teacher": "t", "seed": 0, "shape": [2, 2, 1]}
  stopped = pairs_lib.PairsWriter(str(tmp_path / "r"), num_pairs=n, shape=shape, labels=True, made=made)
  stopped.add(chunk(0))
  stopped.add(chunk(8))
  stopped._arrays["x"][16:24] = 7.0  # the third chunk half written when the process died
  del stopped
  again = pairs_lib.PairsWriter(str(tmp_path / "r"), num_pairs=n, shape=shape, labels=True, made=dict(made))
  assert again.filled == 16 and again.discarded is None
  for i in range(16, n + 8, 8):
    again.add(chunk(i))
  again.close({"teacher": "t"})
  for name in ("x", "noise", "label"):
    np.testing.assert_array_equal(np.load(tmp_path / "r" / f"{name}.npy"), np.load(tmp_path / "p" / f"{name}.npy"))
  assert not (tmp_path / "r.partial").exists() and not (tmp_path / "r" / "progress.json").exists()
  # unfinished pairs made otherwise, or of another size, are removed and begun again, saying why
  for kwargs, why in ((dict(made=dict(made, seed=1)), "made with seed=0, this run has 1"),
                      (dict(made=made, shape=(4, 1, 1)), "shape=[2, 2, 1], this run's are [4, 1, 1]"),
                      (dict(made=made, labels=False), "labels=True, this run's are False"),
                      (dict(made=made, dtype="float16"), "dtype='float32', this run's are 'float16'")):
    pairs_lib.PairsWriter(str(tmp_path / "s"), num_pairs=n, shape=shape, labels=True, made=made).add(chunk(0))
    other = pairs_lib.PairsWriter(str(tmp_path / "s"), **{"num_pairs": n, "shape": shape, "labels": True, **kwargs})
    assert other.filled == 0 and why in other.discarded, other.discarded
    other.discard()
    assert not (tmp_path / "s.partial").exists()
  os.makedirs(tmp_path / "s.partial")  # stopped before its first chunk was written
  assert "no progress.json" in pairs_lib.PairsWriter(str(tmp_path / "s"), num_pairs=n, shape=shape,
                                                     labels=True).discarded
  # stored as float16: half the bytes, read back as float32 (each value rounded to float16)
  half = pairs_lib.PairsWriter(str(tmp_path / "h"), num_pairs=n, shape=shape, labels=False, dtype="float16")
  xs = x / 7.0  # values float16 cannot hold exactly
  for i in range(0, n, 8):
    half.add({"x": xs[i:i + 8], "noise": -xs[i:i + 8]})
  half.close({})
  stored = np.load(tmp_path / "h" / "x.npy", mmap_mode="r")
  assert stored.dtype == np.float16 and os.path.getsize(tmp_path / "h" / "x.npy") - stored.offset == n * 4 * 2
  batch = next(pairs_lib.create_pairs_dataset(str(tmp_path / "h"), batch_size=4, use_labels=False))
  assert batch["x"].dtype == batch["noise"].dtype == np.float32 and set(batch) == {"x", "noise"}
  rows = [int(np.argmin(np.abs(xs[:, 0, 0, 0] - v))) for v in batch["x"][:, 0, 0, 0]]
  np.testing.assert_array_equal(batch["x"], xs[rows].astype(np.float16).astype(np.float32))
  assert not np.array_equal(batch["x"], xs[rows]) and np.array_equal(batch["noise"], -batch["x"])

  def check(batch):
    assert batch["x"].shape == (4, *shape) and np.array_equal(batch["noise"], -batch["x"])
    np.testing.assert_array_equal(batch["label"], (batch["x"][:, 0, 0, 0] // 4).astype(np.int32) % 7)

  one = pairs_lib.create_pairs_dataset(str(tmp_path / "p"), batch_size=4, use_labels=True, seed=1,
                                       batch_rows=range(4))
  first = [next(one) for _ in range(10)]  # past an epoch (30 pairs)
  for b in first:
    check(b)
  epoch = np.concatenate([b["x"][:, 0, 0, 0] for b in first[:7]]).tolist()  # shuffled, no pair twice
  assert len(set(epoch)) == 28 and epoch != sorted(epoch)
  # two hosts, each reading its rows of every global batch of 4: together the same batches
  hosts = [pairs_lib.create_pairs_dataset(str(tmp_path / "p"), batch_size=2, use_labels=True, seed=1,
                                          shard_index=h, shard_count=2, batch_rows=[2 * h, 2 * h + 1])
           for h in range(2)]
  for b in first[:4]:
    halves = [next(it) for it in hosts]
    np.testing.assert_array_equal(np.concatenate([h["x"] for h in halves]), b["x"])
  resumed = pairs_lib.create_pairs_dataset(str(tmp_path / "p"), batch_size=4, use_labels=True, seed=1,
                                           batch_rows=range(4))
  probe = pairs_lib.create_pairs_dataset(str(tmp_path / "p"), batch_size=4, use_labels=True, seed=1,
                                         batch_rows=range(4))
  for _ in range(6):
    next(probe)
  resumed.set_state(probe.get_state())
  np.testing.assert_array_equal(next(resumed)["x"], first[6]["x"])

  with pytest.raises(DataError, match="already holds 30 pairs"):
    pairs_lib.PairsWriter(str(tmp_path / "p"), num_pairs=4, shape=shape, labels=False)
  os.makedirs(tmp_path / "half")  # e.g. a copy that stopped midway
  with pytest.raises(DataError, match="holds no pairs.json"):
    pairs_lib.PairsWriter(str(tmp_path / "half"), num_pairs=4, shape=shape, labels=False)
  with pytest.raises(DataError, match="fewer than a batch"):
    pairs_lib.create_pairs_dataset(str(tmp_path / "p"), batch_size=32, use_labels=False)

"""Image folders: class labels, corrupt and foreign files, crop/resize/flip, slices, resume, errors."""

from __future__ import annotations

import collections
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import load_config
from jaxdiff import checkpoint as ckpt_lib
from jaxdiff import configs as config_lib
from jaxdiff import data as data_lib
from jaxdiff import sharding
from jaxdiff.errors import DataError

VALID = {"cat": 9, "dog": 7}  # decodable images per class in `messy_folder`


def _save(path, arr, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path, format=fmt)


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
  """cat/: 8 RGB PNGs + 1 RGBA PNG + a garbage '.png' + a '.txt';
  dog/: 5 JPEGs + a PNG named '.jpg' + a greyscale PNG + a truncated JPEG + a '.gif'; a hidden file."""
  root = str(tmp_path_factory.mktemp("messy"))
  rng = np.random.default_rng(0)
  for i in range(8):
    _save(f"{root}/cat/{i:02d}.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
  _save(f"{root}/cat/rgba.png", rng.integers(0, 256, (24, 24, 4), dtype=np.uint8))
  with open(f"{root}/cat/broken.png", "wb") as f:
    f.write(b"this is not an image at all" * 10)
  with open(f"{root}/cat/notes.txt", "w") as f:
    f.write("not an image")
  for i in range(5):
    _save(f"{root}/dog/sub/{i:02d}.jpg", rng.integers(0, 256, (40, 24, 3), dtype=np.uint8))
  _save(f"{root}/dog/actually_png.jpg", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), fmt="PNG")
  _save(f"{root}/dog/grey.png", rng.integers(0, 256, (18, 18), dtype=np.uint8))
  with open(f"{root}/dog/sub/00.jpg", "rb") as f:
    good = f.read()
  with open(f"{root}/dog/truncated.jpg", "wb") as f:
    f.write(good[: len(good) // 2])  # a valid JPEG header, then nothing
  _save(f"{root}/dog/anim.gif", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), fmt="GIF")
  _save(f"{root}/.hidden.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
  return root


def folder(root, **kw):
  args = dict(dataset="folder", data_dir=root, batch_size=5, resolution=16, num_channels=3, num_threads=2)
  args.update(kw)
  return data_lib.create_dataset(**args)


def one_epoch(root, **kw):
  return list(folder(root, num_epochs=1, shuffle=False, drop_remainder=False, **kw))


def keys(batches):
  imgs = np.round((np.concatenate([b["x"] for b in batches]) + 1) * 127.5).astype(np.uint8)
  return collections.Counter(im.tobytes() for im in imgs)


def test_folder_epoch_skips_corrupt_and_foreign_files_and_counts_them(messy_folder, caplog):
  with caplog.at_level(logging.INFO, logger="jaxdiff"):
    batches = one_epoch(messy_folder, use_labels=True)
  x = np.concatenate([b["x"] for b in batches])
  y = np.concatenate([b["label"] for b in batches])
  assert x.shape == (16, 16, 16, 3) and x.dtype == np.float32 and y.dtype == np.int32
  assert -1.0 <= x.min() and x.max() <= 1.0
  assert np.bincount(y).tolist() == [VALID["cat"], VALID["dog"]]  # cat=0, dog=1 (sorted names)
  log = caplog.text
  assert "18 images in 2 classes" in log  # 18 files have an image extension ...
  assert "17 images, 1 corrupt file(s) skipped" in log and "cat/broken.png" in log  # bad header
  assert "2 file(s) without" in log  # notes.txt, anim.gif
  assert "Skipping unreadable image" in log and "truncated.jpg" in log  # ... one fails to decode
  assert "1 unreadable image(s) skipped so far" in log


def test_corrupt_file_never_stops_training_and_is_logged_once(messy_folder, caplog):
  with caplog.at_level(logging.WARNING, logger="jaxdiff"):
    it = folder(messy_folder, batch_size=8, seed=1)  # repeats forever, reshuffled
    batches = [next(it) for _ in range(8)]  # four epochs of 16
  assert keys(batches[:2]) == keys(batches[2:4]) == keys(batches[6:8])
  assert caplog.text.count("truncated.jpg") == 1


def test_folder_without_labels_needs_no_class_folders(tmp_path):
  rng = np.random.default_rng(1)
  for i in range(6):
    _save(f"{tmp_path}/{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
  batches = one_epoch(str(tmp_path), resolution=8)
  assert sum(len(b["x"]) for b in batches) == 6 and "label" not in batches[0]
  with pytest.raises(DataError, match=r"use_labels=True needs one sub-folder per class .* 6 of 6 images "
                                      r"lie directly in it .*use_labels=False"):
    one_epoch(str(tmp_path), use_labels=True)


def test_centre_crop_resize_and_flip(tmp_path):
  # 48x16: red | green | red; the centred 16x16 square is all green
  img = np.zeros((16, 48, 3), np.uint8)
  img[:, :, 0] = 255
  img[:, 16:32] = (0, 255, 0)
  _save(f"{tmp_path}/wide/a.png", img)
  x = one_epoch(f"{tmp_path}/wide", resolution=8, centered=False)[0]["x"]
  np.testing.assert_allclose(x[0], np.broadcast_to([0.0, 1.0, 0.0], (8, 8, 3)), atol=1e-6)

  # crop_size: the centred 32x32 of a 64x64 image is green, the rest red
  big = np.zeros((64, 64, 3), np.uint8)
  big[:, :, 0] = 255
  big[16:48, 16:48] = (0, 255, 0)
  _save(f"{tmp_path}/big/a.png", big)
  x = one_epoch(f"{tmp_path}/big", resolution=16, crop_size=32, centered=False)[0]["x"]
  np.testing.assert_allclose(x[0], np.broadcast_to([0.0, 1.0, 0.0], (16, 16, 3)), atol=1e-6)

  half = np.zeros((16, 16, 3), np.uint8)
  half[:, :8] = 255  # white left half
  _save(f"{tmp_path}/half/a.png", half)
  it = folder(f"{tmp_path}/half", batch_size=1, resolution=16, random_flip=True, centered=False)
  left_white = [bool(next(it)["x"][0, 0, 0, 0] == 1.0) for _ in range(40)]
  assert 5 < sum(left_white) < 35  # both orientations occur
  it = folder(f"{tmp_path}/half", batch_size=1, resolution=16, random_flip=False, centered=False)
  assert all(next(it)["x"][0, 0, 0, 0] == 1.0 for _ in range(5))

  # greyscale folder read as grey; JPEG decoded at reduced scale still gives the size asked
  _save(f"{tmp_path}/grey/g.jpg", np.full((300, 200), 200, np.uint8))
  g = one_epoch(f"{tmp_path}/grey", num_channels=1, resolution=32, centered=False)[0]["x"]
  assert g.shape == (1, 32, 32, 1) and abs(float(g.mean()) - 200 / 255) < 0.02


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_hosts_split_a_folder(messy_folder, shuffle):
  everything = keys(one_epoch(messy_folder))
  parts = [keys(list(folder(messy_folder, num_epochs=1, shuffle=shuffle, drop_remainder=False,
                            shard_index=i, shard_count=2, seed=9))) for i in range(2)]
  assert sum(everything.values()) == 16
  assert parts[0] + parts[1] == everything
  assert not set(parts[0]) & set(parts[1])


def test_folder_resume_through_checkpoint_and_prefetch(messy_folder, tmp_path):
  make = lambda: folder(messy_folder, batch_size=8, use_labels=True, random_flip=True, seed=3,
                        uniform_dequantization=True)
  full = [next(make()) for _ in range(1)]  # warm the decoder once (and check it runs)
  assert full[0]["x"].shape == (8, 16, 16, 3)
  ref = make()
  full = [next(ref) for _ in range(7)]
  mesh = sharding.create_mesh({"data": -1})
  it = data_lib.prefetch_to_device(make(), mesh, size=2)
  for i in range(3):
    np.testing.assert_array_equal(sharding.to_host(next(it)["x"]), full[i]["x"])
  state = {"w": jnp.ones((3,))}
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ck.save(3, state, data_iterator=it)
  ck.close()
  it.close()
  again = data_lib.prefetch_to_device(make(), mesh, size=2)
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  assert ck.restore(jax.tree.map(jnp.zeros_like, state), data_iterator=again)[0] == 3
  ck.close()
  for i in range(3, 7):
    b = next(again)
    np.testing.assert_array_equal(sharding.to_host(b["x"]), full[i]["x"])
    np.testing.assert_array_equal(sharding.to_host(b["label"]), full[i]["label"])
  again.close()


def test_folder_errors(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(DataError, match=r"data_dir='.*empty' holds no images: no files ending in "
                                      r"\.png, \.jpg, \.jpeg .*\(0 other files\)"):
    folder(str(empty))
  (empty / "readme.txt").write_text("hi")
  (empty / "sub").mkdir()
  (empty / "sub" / "pic.bmp").write_bytes(b"BM")
  with pytest.raises(DataError, match=r"holds no images.*\(2 other files\)"):
    folder(str(empty))
  with pytest.raises(DataError, match=r"data_dir='.*missing' is not a directory"):
    folder(str(tmp_path / "missing"))
  rng = np.random.default_rng(0)
  for i in range(3):
    _save(f"{tmp_path}/grey/{i}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    _save(f"{tmp_path}/rgb/{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
  with pytest.raises(DataError, match=r"have 1 channel .*PIL mode 'L'.*num_channels=3; set "
                                      r"--config.data.num_channels=1"):
    folder(f"{tmp_path}/grey", num_channels=3)
  with pytest.raises(DataError, match=r"have 3 channels .*set --config.data.num_channels=3"):
    folder(f"{tmp_path}/rgb", num_channels=1)
  with pytest.raises(DataError, match=r"num_channels=4 is not supported"):
    folder(f"{tmp_path}/rgb", num_channels=4)
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "a.png").write_bytes(b"garbage")
  with pytest.raises(DataError, match=r"none of this host's 1 image files"):
    folder(str(tmp_path / "junk"))


def test_folder_spec_counts_class_folders(messy_folder):
  assert data_lib.spec("folder", 16, 3, data_dir=messy_folder, use_labels=True).num_classes == 2
  assert data_lib.spec("folder", 16, 3, data_dir=messy_folder).num_classes == 0
  assert data_lib.dataset_size("folder", "train", messy_folder, 0) == 18


def test_folder_config_reads_a_folder(messy_folder):
  c = load_config("folder_ddpm", "runlocal")
  c.data.data_dir = messy_folder
  config_lib.validate(c)
  kwargs = data_lib.dataset_kwargs(c.data)
  b = next(data_lib.create_dataset(**kwargs, batch_size=4, seed=c.seed))
  assert b["x"].shape == (4, 32, 32, 3)
  assert data_lib.spec(c.data.dataset, c.data.resolution, c.data.num_channels).shape == (32, 32, 3)


def test_input_benchmark_runs_on_a_folder_it_writes(tmp_path, capsys):
  import importlib.util

  from conftest import ROOT

  path = os.path.join(ROOT, "benchmarks", "input_bench.py")
  spec = importlib.util.spec_from_file_location("input_bench", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  bench.main(["--dataset", "folder", "--data_dir", str(tmp_path / "f"), "--make_folder", "48",
              "--batch_size", "16", "--batches", "3", "--warmup", "1", "--num_threads", "2"])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["images_per_sec"] > 0 and out["shape"] == [16, 32, 32, 3]
  assert len(os.listdir(tmp_path / "f")) == 3  # disc / square / triangle

"""Small data helpers shared by the notebooks (not part of the library).

Fashion-MNIST is read from the original idx files that the Debian package
``dataset-fashion-mnist`` installs (``/usr/share/datasets/fashion-mnist``). Without them the
helpers fall back to scikit-learn's 8x8 ``load_digits`` and say so.
"""

from __future__ import annotations

import glob
import gzip
import os
import subprocess

import numpy as np

_IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _dpkg_files(package: str) -> list[str]:
  try:
    out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return []
  return out.stdout.split() if out.returncode == 0 else []


def find_fashion_mnist() -> str | None:
  """Directory holding the four Fashion-MNIST idx files (``.gz`` or not), or ``None``."""
  candidates = _dpkg_files("dataset-fashion-mnist")
  candidates += glob.glob("/usr/share/**/train-images-idx3-ubyte*", recursive=True)
  for path in candidates:
    if os.path.basename(path).startswith(_IDX_NAMES["train_images"]):
      folder = os.path.dirname(path)
      if all(_idx_path(folder, name) for name in _IDX_NAMES.values()):
        return folder
  return None


def _idx_path(folder: str, name: str) -> str | None:
  for suffix in (".gz", ""):
    path = os.path.join(folder, name + suffix)
    if os.path.isfile(path):
      return path
  return None


def read_idx(path: str) -> np.ndarray:
  """Reads an idx file (the MNIST format: big-endian header, then uint8 data)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  ndim = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_classification(n_train: int = 10_000, n_test: int = 2_000, seed: int = 0):
  """A subset of Fashion-MNIST (or of sklearn digits), flattened and standardised.

  Returns:
    ``(x_train, y_train, x_test, y_test, name)`` with float32 features of zero mean and unit
    variance (statistics of the training subset) and int32 labels.
  """
  rng = np.random.default_rng(seed)
  folder = find_fashion_mnist()
  if folder is not None:
    x_tr = read_idx(_idx_path(folder, _IDX_NAMES["train_images"]))
    y_tr = read_idx(_idx_path(folder, _IDX_NAMES["train_labels"]))
    x_te = read_idx(_idx_path(folder, _IDX_NAMES["test_images"]))
    y_te = read_idx(_idx_path(folder, _IDX_NAMES["test_labels"]))
    name = f"Fashion-MNIST ({folder})"
  else:
    from sklearn.datasets import load_digits
    print("NOTE: Fashion-MNIST idx files not found (install the Debian package "
          "dataset-fashion-mnist); falling back to sklearn's 8x8 digits.")
    digits = load_digits()
    order = rng.permutation(len(digits.target))
    cut = int(0.8 * len(order))
    x_tr, y_tr = digits.images[order[:cut]], digits.target[order[:cut]]
    x_te, y_te = digits.images[order[cut:]], digits.target[order[cut:]]
    name = "sklearn digits (fallback)"
  train = rng.permutation(len(y_tr))[:n_train]
  test = rng.permutation(len(y_te))[:n_test]
  x_tr = x_tr[train].reshape(len(train), -1).astype(np.float32)
  x_te = x_te[test].reshape(len(test), -1).astype(np.float32)
  mean, std = x_tr.mean(), x_tr.std()
  return ((x_tr - mean) / std, y_tr[train].astype(np.int32),
          (x_te - mean) / std, y_te[test].astype(np.int32), name)


def batch_indices(n: int, batch_size: int, steps: int, seed: int = 0) -> np.ndarray:
  """``(steps, batch_size)`` example indices: shuffled epochs, drawn without replacement."""
  rng = np.random.default_rng(seed)
  per_epoch = n // batch_size
  epochs = -(-steps // per_epoch)
  rows = [rng.permutation(n)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
          for _ in range(epochs)]
  return np.concatenate(rows)[:steps]

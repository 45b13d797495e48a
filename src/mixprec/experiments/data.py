"""Real data, offline: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
and the King James Bible (public domain) from the Debian package ``bible-kjv``."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "DataMissingError",
    "load_fashion_mnist",
    "CharCorpus",
    "load_kjv",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the IDX files."""

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")

_SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
           "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000)}


class DataMissingError(FileNotFoundError):
    """A data set is not installed, or its files are damaged; the message says how to fix it."""


def _read_idx(path: Path, magic: int, count: int, item_shape: tuple[int, ...]) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataMissingError(
            f"cannot read {path} ({error}); reinstall it with `apt-get install --reinstall "
            "dataset-fashion-mnist` or pass --data-dir with intact files"
        ) from error
    header = 4 * (1 + 1 + len(item_shape))
    values = np.frombuffer(raw[:header], dtype=">u4")
    expected = [magic, count, *item_shape]
    size = count * int(np.prod(item_shape, dtype=np.int64))
    if values.tolist() != expected or len(raw) != header + size:
        raise DataMissingError(
            f"{path} is not the expected IDX file (header {values.tolist()}, {len(raw)} bytes; expected "
            f"{expected}, {header + size} bytes): it may be truncated; reinstall the package "
            "dataset-fashion-mnist"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(count, *item_shape)


def load_fashion_mnist(split: str = "train", data_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 (N, 1, 28, 28) scaled to [0, 1], and int64 labels (N,), of the
    ``"train"`` (60,000) or ``"test"`` (10,000) split."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    directory = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    images_name, labels_name, count = _SPLITS[split]
    images_path, labels_path = directory / images_name, directory / labels_name
    if not images_path.exists() or not labels_path.exists():
        raise DataMissingError(
            f"Fashion-MNIST is not in {directory}: install the Debian package with "
            "`apt-get install dataset-fashion-mnist` (the README's set-up does), or pass --data-dir "
            f"to a folder holding {images_name} and {labels_name}"
        )
    images = _read_idx(images_path, 2051, count, (28, 28))
    labels = _read_idx(labels_path, 2049, count, ())
    images_t = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return images_t, torch.from_numpy(labels.astype(np.int64))


@dataclass(frozen=True)
class CharCorpus:
    """A character-level corpus: the text, its sorted alphabet, and a fixed split (the
    first 90% of characters for training, the last 10% for validation)."""

    text: str
    alphabet: str

    @property
    def vocabulary_size(self) -> int:
        """Number of distinct characters."""
        return len(self.alphabet)

    def encode(self, text: str) -> torch.Tensor:
        """Characters to int64 indices."""
        index = {ch: i for i, ch in enumerate(self.alphabet)}
        return torch.tensor([index[ch] for ch in text], dtype=torch.int64)

    def decode(self, indices: torch.Tensor) -> str:
        """Indices back to text."""
        return "".join(self.alphabet[i] for i in indices.tolist())

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training and validation character indices."""
        data = torch.frombuffer(bytearray(self.text.encode("ascii")), dtype=torch.uint8).long()
        lookup = torch.full((256,), -1, dtype=torch.int64)
        lookup[torch.tensor([ord(ch) for ch in self.alphabet])] = torch.arange(len(self.alphabet))
        encoded = lookup[data]
        cut = int(0.9 * len(encoded))
        return encoded[:cut], encoded[cut:]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mixprec"


def load_kjv(cache_dir: str | Path | None = None) -> CharCorpus:
    """The King James Bible as clean ASCII, one verse a line with the verse references
    stripped (about 4.1M characters), from the Debian package ``bible-kjv``'s ``bible``
    command; extracted once and cached in ``~/.cache/mixprec/kjv.txt``."""
    cache = Path(cache_dir) if cache_dir is not None else _cache_dir()
    cached = cache / "kjv.txt"
    if cached.exists():
        text = cached.read_text(encoding="ascii")
    else:
        program = shutil.which("bible")
        if program is None:
            raise DataMissingError(
                "the `bible` command is missing: install the Debian package with "
                "`apt-get install bible-kjv` (the README's set-up does)"
            )
        raw = subprocess.run([program, "-f", "gen1:1-rev22:21"], capture_output=True, text=True,
                             check=True, timeout=120).stdout
        verses = [re.sub(r"^\S+?\d+:\d+ ", "", line) for line in raw.splitlines() if line.strip()]
        if len(verses) != 31102:
            raise DataMissingError(f"`bible` printed {len(verses)} verses, not 31,102: reinstall bible-kjv")
        text = "\n".join(verses) + "\n"
        cache.mkdir(parents=True, exist_ok=True)
        temporary = cached.with_suffix(".tmp")
        temporary.write_text(text, encoding="ascii")
        temporary.replace(cached)
    return CharCorpus(text=text, alphabet="".join(sorted(set(text))))

"""mixprec.experiments.data on the real, installed data sets, and its errors."""

from __future__ import annotations

import gzip
import shutil

import pytest
import torch

from mixprec.experiments.data import FASHION_MNIST_DIR, DataMissingError, load_fashion_mnist, load_kjv


def test_fashion_mnist_splits():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.mean() > 0.1
    assert torch.equal(labels.bincount(), torch.full((10,), 1000))
    train_images, train_labels = load_fashion_mnist("train")
    assert train_images.shape[0] == train_labels.shape[0] == 60000


def test_missing_and_truncated_files_name_the_package(tmp_path):
    with pytest.raises(DataMissingError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", data_dir=tmp_path)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(FASHION_MNIST_DIR / name, tmp_path / name)
    with gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") as source:
        truncated = source.read()[:-100]
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as target:
        target.write(truncated)
    with pytest.raises(DataMissingError, match="truncated"):
        load_fashion_mnist("test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_fashion_mnist("validation")


def test_kjv_is_clean_and_cached(tmp_path):
    corpus = load_kjv(cache_dir=tmp_path)
    assert corpus.text.startswith("In the beginning God created the heaven and the earth.\n")
    assert corpus.text.count("\n") == 31102
    assert 4_000_000 < len(corpus.text) < 4_300_000
    assert ":" in corpus.alphabet and not any(ch.isdigit() for ch in corpus.alphabet)  # references gone
    assert (tmp_path / "kjv.txt").exists()
    assert load_kjv(cache_dir=tmp_path) == corpus  # from the cache
    train, validation = corpus.split()
    assert len(train) + len(validation) == len(corpus.text)
    assert corpus.decode(train[:6]) == "In the"
    assert torch.equal(corpus.encode("In the"), train[:6])

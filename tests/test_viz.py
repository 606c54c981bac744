import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ibot import viz
from ibot.builders.sources import load_backbone, load_head
from ibot.config import build_config
from ibot.train.trainer import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("viz_run")
    cfg = build_config(
        "smoke", [f"run.output_dir={path}", "run.progress=false", "run.knn_at_end=false", "run.max_steps=3"]
    )
    Trainer(cfg, log=lambda *a: None).fit()
    return path


def _png(path):
    arr = np.asarray(Image.open(path).convert("RGB")).astype(float)
    assert arr.shape[0] > 50 and arr.shape[1] > 50
    assert arr.std() > 5  # not blank
    return arr


def test_attention_png_and_threshold(run, tmp_path):
    backbone, info, _ = load_backbone(run)
    images = viz.load_images(info, n=3)
    attn = viz.cls_attention(backbone.eval(), images)
    assert attn.shape == (3, 2, 4, 4)
    total = attn.sum((-1, -2))  # CLS-to-patch share of the softmax (CLS-to-CLS left out)
    assert ((total > 0) & (total <= 1 + 1e-6)).all()
    kept = viz.cls_attention(backbone, images, threshold=0.6)
    assert set(kept.unique().tolist()) <= {0.0, 1.0} and kept.sum() < kept.numel()
    out = viz.plot_attention(backbone, images, tmp_path / "a.png", info["mean"], info["std"], threshold=None)
    arr = _png(out)
    w = arr.shape[1] // 4  # image column vs overlay column differ
    assert np.abs(arr[:, :w] - arr[:, w : 2 * w]).mean() > 1


def test_patterns_pngs(run, tmp_path):
    backbone, info, _ = load_backbone(run)
    head = load_head(run).eval()
    images = viz.load_images(info, n=16)
    paths = viz.plot_patterns(backbone.eval(), head, images, tmp_path, info["mean"], info["std"], show=3, topk=6)
    assert len(paths) == 3  # the 3 most populated prototypes
    for p in paths:
        _png(p)
    paths = viz.plot_patterns(backbone, head, images, tmp_path / "cls", info["mean"], info["std"], show=2, kind="cls")
    assert paths


def test_geometric_accuracy_of_true_vs_random_matches():
    grid = 8
    box_a, box_b = (0, 0, 48), (16, 16, 48)  # two crops of a 64-px image
    true = torch.zeros(grid * grid, dtype=torch.long)
    for t in range(grid * grid):
        r, c = divmod(t, grid)
        rb = min(grid - 1, max(0, round((r + 0.5) * 6 - 16) // 6))
        cb = min(grid - 1, max(0, round((c + 0.5) * 6 - 16) // 6))
        true[t] = rb * grid + cb
    assert viz.geometric_accuracy(true, grid, box_a, box_b) == 1.0
    rand = torch.randint(0, grid * grid, (grid * grid,), generator=torch.Generator().manual_seed(0))
    assert viz.geometric_accuracy(rand, grid, box_a, box_b) < 0.3


class _PatchMeans(torch.nn.Module):
    """A stand-in backbone whose patch features are the mean pixel of each 8-px patch."""

    patch_size = 8

    def grid_size(self, h, w):
        return h // 8, w // 8

    def forward(self, x):
        p = F.avg_pool2d(x, 8).flatten(2).transpose(1, 2)  # (B, N, C)
        return p.mean(1), p


def test_correspondence_accuracy_over_images():
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    where = torch.stack([xx / 32, yy / 32, torch.ones(32, 32)])  # each pixel encodes its position
    score = viz.correspondence_accuracy(_PatchMeans(), where.expand(3, -1, -1, -1))
    assert score["n"] == 3 and score["accuracy"] == 1.0  # position features match where geometry says
    assert 0.0 < score["chance"] < 0.5  # 4 x 4 grid, tolerance half a patch
    flat = viz.correspondence_accuracy(_PatchMeans(), torch.ones(2, 3, 32, 32))  # every patch alike
    assert flat["accuracy"] < 0.5
    assert viz.two_view_boxes(32) == [(0, 0, 24), (8, 8, 24)]


def test_correspondence_png_and_cli(run, tmp_path):
    from ibot.cli import main

    assert main(["viz", "correspond", str(run), "--out", str(tmp_path / "c.png")]) == 0
    _png(tmp_path / "c.png")
    assert main(["viz", "curves", str(run), "--out", str(tmp_path / "curves.png")]) == 0
    _png(tmp_path / "curves.png")
    assert main(["viz", "attention", str(run), "--out", str(tmp_path / "att.png"), "--n", "2"]) == 0

import pytest
import torch
import torch.nn.functional as F

from ibot.config import build_config
from ibot.data.datasets import TensorImageDataset
from ibot.eval.knn import knn_classify
from ibot.eval.linear import linear_accuracy, train_linear_sweep
from ibot.eval.protocols import run_knn, run_linear
from ibot.train.trainer import Trainer


def test_knn_matches_bruteforce_and_small_test_sets():
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(50, 8, generator=g), dim=-1)
    ytr = torch.randint(0, 3, (50,), generator=g)
    test = F.normalize(torch.randn(7, 8, generator=g), dim=-1)  # fewer than 100 queries
    yte = torch.randint(0, 3, (7,), generator=g)
    acc = knn_classify(train, ytr, test, yte, ks=(5, 200), max_chunk_elements=60)  # chunks of 1 query
    correct = 0
    for i in range(7):
        sim = train @ test[i]
        top, idx = sim.topk(5)
        votes = torch.zeros(3).index_add_(0, ytr[idx], (top / 0.07).exp())
        correct += int(votes.argmax() == yte[i])
    assert acc[5][0] == pytest.approx(100 * correct / 7)
    assert 50 in acc  # k capped at the memory-bank size


def test_linear_sweep_picks_on_validation_and_learns():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.randint(0, 4, (600,), generator=g)
    x = centers[y] + torch.randn(600, 16, generator=g)
    lr, w, b, sweep = train_linear_sweep(x[:400], y[:400], x[400:500], y[400:500], 4, lrs=(1e-4, 1e-2, 1.0), epochs=10)
    assert sweep[lr] == max(sweep.values())
    assert linear_accuracy(w, b, x[500:], y[500:])[0] > 90


def test_run_protocols_and_cache_invalidation(tmp_path):
    run = tmp_path / "run"
    overrides = ["run.progress=false", "run.knn_at_end=false", "run.max_steps=2"]
    cfg = build_config("smoke", [f"run.output_dir={run}", *overrides])
    Trainer(cfg, log=lambda *a: None).fit()
    cache = tmp_path / "feats.pt"
    logs = []
    a = run_knn(run, cache=str(cache), log=logs.append)
    b = run_knn(run, cache=str(cache), log=logs.append)
    assert a["knn"] == b["knn"] and any("reusing cache" in m for m in logs)
    logs.clear()
    run_knn(run, cache=str(cache), which="student", log=logs.append)  # other weights: not reused
    assert any("recomputing" in m for m in logs)
    res = run_linear(run, epochs=20, n_last_blocks=2, avgpool=True, log=lambda m: None)
    assert (res["n_fit"] + res["n_val"], res["n_test"]) == (64, 16) and res["n_val"] > 0
    assert res["test_top1"] >= 40  # 4 classes: chance 25% (measured: 9 of 16 right)


def test_finetune_layer_decay_and_run(tmp_path):
    from ibot.builders.sources import load_backbone
    from ibot.eval.finetune import finetune, layer_decay_groups

    run = tmp_path / "run"
    cfg = build_config(
        "smoke", [f"run.output_dir={run}", "run.progress=false", "run.knn_at_end=false", "run.max_steps=1"]
    )
    tr = Trainer(cfg, log=lambda *a: None)
    tr.fit()
    backbone, info, _ = load_backbone(run)
    for p in backbone.vit.parameters():
        p.requires_grad_(True)
    groups = layer_decay_groups(backbone.vit, 0.05, 0.5)
    scales = {g["lr_scale"] for g in groups}
    assert max(scales) == 1.0 and min(scales) == pytest.approx(0.5**3)  # depth 2: layers 0..3

    def dark_or_bright(n, seed):  # separable in one epoch, but only by a head and backbone that learn
        gen = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 2
        base = torch.where(y.view(-1, 1, 1, 1) == 1, 200.0, 50.0)
        images = (base + 20 * torch.randn(n, 3, 32, 32, generator=gen)).clamp(0, 255).to(torch.uint8)
        return TensorImageDataset(images, y, ["dark", "bright"])

    res = finetune(
        backbone,
        dark_or_bright(64, 0),
        dark_or_bright(32, 1),
        num_classes=2,
        image_size=32,
        epochs=1,
        batch_size=16,
        log=lambda m: None,
    )
    assert res["test_top1"] >= 90  # measured 100%; with lr=0 (no learning): 0%

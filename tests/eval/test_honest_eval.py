"""Evaluation never scores training images: an ImageFolder without val/ is split, and says so."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ibot.builders.data import dataset_from_config
from ibot.cli import main
from ibot.config import build_config
from ibot.data.datasets import DatasetError, build_dataset, stratified_holdout
from ibot.eval.protocols import run_knn, run_linear
from ibot.train.trainer import Trainer

CLASSES = ("a", "b", "c")


def noise_folder(root, per_class=10, size=32, seed=0):
    """3 classes of pure-noise images: nothing to learn, so honest accuracy is near chance (33%)."""
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def smoke_on(folder, run, *extra):
    return build_config(
        "smoke",
        [
            "data.dataset=imagefolder",
            f"data.path={folder}",
            f"run.output_dir={run}",
            "run.progress=false",
            "optim.batch_size=8",
            "run.max_steps=2",
            *extra,
        ],
    )


def test_stratified_holdout_is_seeded_per_class_and_nested():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 2)
    kept, held = stratified_holdout(labels, 0.2)
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(32))
    assert torch.bincount(labels[held]).tolist() == [2, 4, 1]  # round(0.2 n_c), at least 1, never the whole class
    assert torch.equal(held, stratified_holdout(labels, 0.2)[1])  # seeded
    smaller = set(stratified_holdout(labels, 0.1)[1].tolist())
    assert smaller < set(held.tolist())  # a smaller share holds out a subset: never a training image


def test_imagefolder_without_val_splits_and_describes_it(tmp_path):
    root = noise_folder(tmp_path / "imgs")
    train = build_dataset("imagefolder", str(root), train=True, holdout=0.2)
    test = build_dataset("imagefolder", str(root), train=False, holdout=0.2)
    train_files, test_files = {p for p, _ in train.samples}, {p for p, _ in test.samples}
    assert not train_files & test_files and len(train_files | test_files) == 30
    assert torch.bincount(test.labels).tolist() == [2, 2, 2]
    assert "held-out 6 of 30" in test.split and "24 of 30" in train.split
    with pytest.raises(DatasetError, match="no val/ folder and data.holdout=0"):
        build_dataset("imagefolder", str(root), train=False, holdout=0)
    assert len(build_dataset("imagefolder", str(root), train=True, holdout=0)) == 30


def test_train_val_layout_is_used_as_is_and_val_without_train_is_an_error(tmp_path):
    noise_folder(tmp_path / "d" / "train")
    noise_folder(tmp_path / "d" / "val", per_class=2, seed=1)
    train = build_dataset("imagefolder", str(tmp_path / "d"), train=True)
    test = build_dataset("imagefolder", str(tmp_path / "d"), train=False)
    assert (len(train), len(test)) == (30, 6) and test.split.startswith("val/")
    noise_folder(tmp_path / "e" / "val")
    with pytest.raises(DatasetError, match="no train/ folder"):
        build_dataset("imagefolder", str(tmp_path / "e"), train=True)


def test_pretraining_knn_queries_are_disjoint_from_bank_and_training(tmp_path, capsys):
    folder = noise_folder(tmp_path / "imgs")
    cfg = smoke_on(folder, tmp_path / "run", "data.holdout=0.3")
    tr = Trainer(cfg)
    queries = dataset_from_config(cfg, train=False)
    query_files = {p for p, _ in queries.samples}
    assert len(query_files) == 9 and not query_files & {p for p, _ in tr.data.train_set.samples}
    assert tr.data.bank_set is tr.data.train_set  # the k-NN memory bank is the training split, without the queries
    result = tr.fit()
    assert (result["knn"]["n_train"], result["knn"]["n_test"]) == (21, 9)
    assert result["knn"]["split"].startswith("held-out 9 of 30")
    out = capsys.readouterr().out
    assert "training on 21 of 30 images" in out and "9 queries: held-out 9 of 30" in out
    assert "held-out 9 of 30" in json.loads((tmp_path / "run" / "summary.json").read_text())["knn"]["split"]


def test_knn_and_linear_cli_score_held_out_images_only(tmp_path, capsys):
    """Queries in the memory bank give 100% at k=1; held-out noise images give about chance."""
    folder = noise_folder(tmp_path / "imgs", per_class=20)
    run = tmp_path / "run"
    Trainer(smoke_on(folder, run, "run.knn_at_end=false", "data.holdout=0.25")).fit()
    res = run_knn(run, ks=(1,), log=lambda m: None)
    assert (res["n_train"], res["n_test"]) == (45, 15) and "held-out 15 of 60" in res["split"]
    assert res["knn"]["1"]["top1"] < 70  # 100.0 when the queries are the training images
    leaky = run_knn(run, ks=(1,), log=lambda m: None, dataset="imagefolder", data_path=str(folder))
    assert leaky["n_test"] == 15  # --data without a run config: the default 10% would be a subset; still held out
    lin = run_linear(run, epochs=2, n_last_blocks=1, log=lambda m: None)
    assert lin["n_test"] == 15 and lin["n_fit"] + lin["n_val"] == 45 and "held-out" in lin["split"]
    capsys.readouterr()
    assert main(["knn", str(run), "--ks", "1", "--limit", "9", "--batch-size", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "k-NN queries: 9 images spread over held-out 15 of 60" in out


def test_progress_bars_and_unlabelled_folder_refusal(tmp_path, capsys):
    folder = noise_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    Trainer(smoke_on(folder, run, "run.knn_at_end=false")).fit()
    capsys.readouterr()
    assert main(["linear", str(run), "--epochs", "2", "--n-last-blocks", "1", "--batch-size", "5"]) == 0
    err = capsys.readouterr().err
    for bar in ("linear train features", "linear test features", "linear probe (45 lrs)"):
        assert bar in err, bar
    assert "27/27" in err and "img/s" in err  # the feature bar reached the 27 training images, with its rate
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "0.png")
    assert main(["knn", str(run), "--dataset", "folder", "--data", str(flat)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ibot: error:") and "needs class sub-folders: --dataset imagefolder" in err[-1]


def test_interrupt_messages_name_the_command(monkeypatch, capsys):
    import ibot.eval.protocols as protocols

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(protocols, "run_knn", interrupted)
    assert main(["knn", "runs/x"]) == 130
    err = capsys.readouterr().err
    assert "`ibot knn runs/x` interrupted" in err and "--resume" not in err
    import ibot.train.trainer as trainer

    monkeypatch.setattr(trainer.Trainer, "__init__", interrupted)
    assert main(["pretrain", "preset=smoke", "run.output_dir=runs/y"]) == 130
    assert "ibot pretrain --resume runs/y" in capsys.readouterr().err


def test_knn_split_val_on_a_folder_draws_every_class(tmp_path):
    from ibot.data.datasets import validation_split

    train = build_dataset("imagefolder", str(noise_folder(tmp_path / "imgs")), train=True)
    bank, queries = validation_split(train)
    assert torch.bincount(queries.labels).tolist() == [2, 2, 2]  # not the last 6 images (all class c)
    assert not {p for p, _ in bank.samples} & {p for p, _ in queries.samples} and len(bank) + len(queries) == 27


def test_holdout_zero_trains_on_everything_and_skips_evaluation_with_the_reason(tmp_path):
    logs = []
    tr = Trainer(smoke_on(noise_folder(tmp_path / "imgs"), tmp_path / "run", "data.holdout=0"), log=logs.append)
    assert len(tr.data.train_set) == 30
    assert tr.fit()["knn"] is None
    skipped = [m for m in logs if m.startswith("k-NN skipped")]
    assert len(skipped) == 1 and "no val/ folder and data.holdout=0" in skipped[0]

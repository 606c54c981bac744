"""``ibot pretrain data.path=DIR`` alone trains on DIR: what the folder holds is detected and printed."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ibot.cli import main
from ibot.config import build_config, flatten, to_dict
from ibot.data.datasets import DatasetError
from ibot.data_setup import folder_overrides, inspect_folder


def _images(folder, n, mode="RGB", seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (32, 32, 3) if mode == "RGB" else (32, 32)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.jpg")


def _preset(name):
    return flatten(to_dict(build_config(name)))


def test_inspect_tells_imagefolder_flat_folder_and_no_images(tmp_path):
    for c in ("cat", "dog", "eel"):
        _images(tmp_path / "cls" / c, 4)
    info = inspect_folder(tmp_path / "cls")
    assert (info["dataset"], info["classes"], info["n_images"], info["channels"]) == (
        "imagefolder",
        ["cat", "dog", "eel"],
        12,
        3,
    )
    _images(tmp_path / "flat", 5, mode="L")
    (tmp_path / "flat" / "sub").mkdir()  # one sub-folder with images is not a class layout
    _images(tmp_path / "flat" / "sub", 2, mode="L")
    info = inspect_folder(tmp_path / "flat")
    assert (info["dataset"], info["n_images"], info["channels"]) == ("folder", 7, 1)
    for c in ("cat", "dog"):
        _images(tmp_path / "tv" / "train" / c, 3)
    info = inspect_folder(tmp_path / "tv")  # train/ without val/: its classes, evaluated on a held-out share
    assert (info["dataset"], info["classes"], info["has_val"]) == ("imagefolder", ["cat", "dog"], False)
    _images(tmp_path / "tv" / "val" / "cat", 1)
    assert inspect_folder(tmp_path / "tv")["has_val"]
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03")
    assert inspect_folder(tmp_path / "idx") is None  # e.g. Fashion-MNIST files: the preset's dataset stays


def test_overrides_fit_the_default_preset_to_the_folder(tmp_path, monkeypatch):
    import ibot.data_setup as data_setup

    monkeypatch.setattr(data_setup, "available_cores", lambda: 8)  # the preset's 4 workers fit
    for c in ("a", "b", "c"):
        _images(tmp_path / "imgs" / c, 100)
    add, msg = folder_overrides(_preset("fmnist_tiny"), {"data.path": str(tmp_path / "imgs")})
    assert add == {
        "data.dataset": "imagefolder",
        "data.pipeline": "auto",
        "model.in_chans": 3,
        "optim.batch_size": 32,  # 270 training images: 8 steps per epoch, not 1
    }
    assert "ImageFolder with 3 classes, 300 images (no val/: 30 images" in msg
    user = {"data.path": str(tmp_path / "imgs"), "data.dataset": "imagefolder"}
    assert folder_overrides(_preset("fmnist_tiny"), user) == ({}, None)  # an explicit dataset is kept
    add, _ = folder_overrides(_preset("smoke"), {"data.path": str(tmp_path / "imgs"), "optim.batch_size": 4})
    assert add == {"data.dataset": "imagefolder"}  # smoke is RGB already; the user's batch is kept
    with pytest.raises(DatasetError, match="does not exist"):
        folder_overrides(_preset("smoke"), {"data.path": str(tmp_path / "nope")})


def test_pretrain_with_only_data_path_trains_on_the_folder(tmp_path, capsys):
    _images(tmp_path / "flat", 24)
    run = tmp_path / "run"
    args = ["pretrain", "preset=smoke", f"data.path={tmp_path / 'flat'}", f"run.output_dir={run}"]
    assert main([*args, "run.progress=false", "run.max_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "a folder of 24 unlabelled images" in out and "set data.dataset=folder" in out
    assert "k-NN skipped: data.dataset=folder has no labels" in out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["dataset"] == "folder" and cfg["data"]["path"] == str(tmp_path / "flat")


def test_in_memory_decodes_a_folder_for_the_in_memory_paths(tmp_path):
    from ibot.data.datasets import FileImageDataset, in_memory

    for c in ("a", "b"):
        _images(tmp_path / "imgs" / c, 3, seed=ord(c))
    Image.new("RGB", (40, 20), (10, 200, 30)).save(tmp_path / "imgs" / "b" / "wide.png")
    files = FileImageDataset(tmp_path / "imgs")
    mem = in_memory(files, 16)
    assert mem.images.shape == (7, 3, 16, 16) and mem.images.dtype == torch.uint8
    assert mem.labels.tolist() == files.labels.tolist() and mem.classes == ["a", "b"]
    wide = [i for i, (p, _) in enumerate(files.samples) if p.endswith("wide.png")][0]
    assert mem.images[wide, :, 8, 8].tolist() == [10, 200, 30]  # resized by the shorter side, center-cropped


def test_a_preset_asking_more_workers_than_cores_gets_the_cores(tmp_path, monkeypatch):
    import ibot.data_setup as data_setup

    monkeypatch.setattr(data_setup, "available_cores", lambda: 2)
    for c in ("a", "b"):
        _images(tmp_path / "imgs" / c, 20)
    add, msg = folder_overrides(_preset("vit_small_in1k"), {"data.path": str(tmp_path / "imgs")})
    assert add["data.num_workers"] == 2 and "data.num_workers=2" in msg  # the preset's 10 on 2 cores
    add, _ = folder_overrides(_preset("vit_small_in1k"), {"data.path": str(tmp_path / "imgs"), "data.num_workers": 9})
    assert "data.num_workers" not in add  # the user's own value is kept

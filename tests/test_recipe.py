"""``ibot pretrain data.path=DIR`` alone: the recipe fitted to the folder and the machine (ibot/recipe.py)."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from ibot.cli import main
from ibot.config import flatten, to_dict
from ibot.recipe import (
    MIN_HELD_OUT,
    Machine,
    fit_recipe,
    images_per_second,
    patch_for,
    resolve_pretrain_config,
    snap_size,
)

CPU2 = Machine("cpu", 2)


def _info(n=600, side=300, channels=1, classes=2, has_val=False):
    per = [n // classes] * classes
    return {
        "dataset": "imagefolder" if classes else "folder",
        "classes": [f"c{i}" for i in range(classes)],
        "n_images": n,
        "per_class": per,
        "has_val": has_val,
        "n_val": 100 if has_val else 0,
        "channels": channels,
        "median_side": side,
    }


def _fitted(info, machine=CPU2, user=None):
    return {f.key: f.value for f in fit_recipe(info, machine, user or {})}


def _folder(root, n_per_class, side=40, classes=("a", "b")):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (side, side + 8), dtype=np.uint8), "L").save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("side", "device", "size", "patch"),
    [(300, "cpu", 64, 8), (28, "cpu", 32, 4), (50, "cpu", 48, 6), (300, "cuda", 224, 16), (100, "cuda", 96, 8)],
)
def test_resolution_snaps_to_the_ladder_capped_by_the_device_with_an_8_to_14_grid(side, device, size, patch):
    assert (snap_size(side, device), patch_for(snap_size(side, device))) == (size, patch)
    assert 8 <= size // patch <= 14
    fl = _fitted(_info(side=side), Machine(device, 8))
    assert (fl["model.img_size"], fl["model.patch_size"]) == (size, patch)
    assert fl["data.local_crop_size"] % patch == 0 and fl["data.local_crop_size"] < size


def test_model_size_follows_the_images_and_the_device():
    small_cpu = _fitted(_info(n=600), CPU2)
    big_cpu = _fitted(_info(n=50_000), CPU2)
    small_gpu = _fitted(_info(n=600), Machine("cuda", 16))
    big_gpu = _fitted(_info(n=200_000), Machine("cuda", 16))
    widths = [f["model.embed_dim"] for f in (small_cpu, big_cpu, small_gpu, big_gpu)]
    assert widths == [128, 192, 192, 384]
    assert small_cpu["model.out_dim"] < big_gpu["model.out_dim"] == 8192
    # few images, few prototypes: 420 training images -> 128, 2700 -> 512 (the small model's most)
    assert (small_cpu["model.out_dim"], _fitted(_info(n=3000))["model.out_dim"]) == (128, 512)
    assert small_cpu["model.patch_out_dim"] == small_cpu["model.out_dim"]
    assert big_gpu["model.arch"] == "vit_small_patch16_224" and big_gpu["model.norm_last_layer"] is False
    assert small_cpu["loss.koleo_weight"] == 2.0  # the measured small recipe
    assert small_cpu["model.in_chans"] == 1 and _fitted(_info(channels=3))["model.in_chans"] == 3


def test_epochs_come_from_the_time_budget_and_explicit_keys_win():
    info = _info(n=3000, side=64)
    ten = _fitted(info)
    twenty = _fitted(info, user={"run.time_limit_min": 20})
    assert abs(twenty["optim.epochs"] - 2 * ten["optim.epochs"]) <= 1
    fl = {**ten, "optim.batch_size": ten["optim.batch_size"]}
    n_train = 3000 - round(ten["data.holdout"] * 3000)
    expected = int(10 * 60 * images_per_second(fl, 1, CPU2) / n_train)
    assert ten["optim.epochs"] == expected
    assert ten["run.time_limit_min"] == 13.0  # the budget is kept even if the estimate is optimistic
    assert ten["optim.warmup_epochs"] == round(max(0.2, 0.1 * ten["optim.epochs"]), 1)
    mine = _fitted(info, user={"optim.epochs": 7})
    assert mine["optim.epochs"] == 7 and "run.time_limit_min" not in mine  # the user's length, no guard
    assert mine["optim.warmup_epochs"] == 0.7
    slower = _fitted(info, Machine("cpu", 1))  # half the cores: about half the epochs
    assert slower["optim.epochs"] <= ten["optim.epochs"] // 2 + 1
    assert (ten["data.num_workers"], _fitted(info, Machine("cpu", 16))["data.num_workers"]) == (1, 8)


def test_small_folders_hold_out_enough_to_mean_something_and_batches_give_8_steps():
    assert _fitted(_info(n=600))["data.holdout"] == 0.3
    assert _fitted(_info(n=1500))["data.holdout"] == round(MIN_HELD_OUT / 1500, 3)
    assert _fitted(_info(n=3000))["data.holdout"] == 0.1
    assert "data.holdout" not in _fitted(_info(n=600, has_val=True))  # val/ is the evaluation split
    assert _fitted(_info(n=600), user={"data.holdout": 0.2})["data.holdout"] == 0.2
    fl = _fitted(_info(n=600))
    assert 420 // fl["optim.batch_size"] >= 8 and fl["optim.batch_size"] == 32
    assert fl["optim.lr"] * fl["optim.batch_size"] / 256 == pytest.approx(1e-3 * (32 / 256) ** 0.5, rel=0.02)


def test_config_prints_exactly_what_pretrain_trains(tmp_path, capsys):
    data = _folder(tmp_path / "imgs", 12)
    run = tmp_path / "run"
    keys = [f"data.path={data}", f"run.output_dir={run}", "run.max_steps=1", "run.progress=false"]
    assert main(["config", *keys]) == 0
    printed = capsys.readouterr().out
    comments = [line for line in printed.splitlines() if line.startswith("#")]
    shown = yaml.safe_load("\n".join(line for line in printed.splitlines() if not line.startswith("#")))
    assert main(["pretrain", *keys, "run.knn_at_end=false"]) == 0
    out = capsys.readouterr().out
    assert flatten(shown) == {**flatten(json.loads((run / "config.json").read_text())), "run.knn_at_end": True}
    assert "recipe fitted to the folder" in comments[0] and "recipe fitted to the folder" in out
    assert "model.img_size=32" in out and "model.patch_size=4" in out and "images 40 px median short side" in out
    assert "ViT 128 wide x 4 blocks (4 heads), patch 4, 32 px" in out  # the header names the real backbone


def test_presets_and_explicit_keys_win_over_the_fit(tmp_path):
    data = _folder(tmp_path / "imgs", 12)
    cfg, lines = resolve_pretrain_config("smoke", [f"data.path={data}"], CPU2)
    assert cfg.model.embed_dim == 32 and "recipe fitted" not in " ".join(lines)  # the preset, on the folder
    cfg, lines = resolve_pretrain_config(None, [f"data.path={data}", "model.img_size=48", "model.patch_size=6"], CPU2)
    assert (cfg.model.img_size, cfg.model.patch_size, cfg.model.embed_dim) == (48, 6, 128)
    assert not any("model.img_size=" in line for line in lines)  # a key you set is not listed as fitted


def test_a_folder_without_images_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    for preset in ([], ["preset=fmnist_tiny"]):
        code = main(["pretrain", *preset, f"data.path={tmp_path / 'empty'}", f"run.output_dir={tmp_path / 'r'}"])
        err = capsys.readouterr().err
        assert code == 2 and "holds no images" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # nothing trained on a fall-back data set


def test_shards_and_hugging_face_datasets_get_the_folder_recipe(tmp_path):
    """The same images as a folder, as shards (`ibot shards`) and as a Hugging Face dataset (mapped and
    streamed) give the same fitted config and reasons: only the data source keys differ."""
    datasets = pytest.importorskip("datasets")
    from ibot.data.shard_writer import write_shards

    folder = _folder(tmp_path / "imgs", 30, side=40, classes=("a", "b", "c"))
    write_shards(folder, tmp_path / "wds", shard_size=16, progress=False, log=str)
    files = sorted(folder.glob("*/*.png"))
    rows = {"image": [{"bytes": f.read_bytes(), "path": None} for f in files], "label": [f.parent.name for f in files]}
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    rows["label"] = [feats["label"].str2int(x) for x in rows["label"]]
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "hf"))
    sources = [[folder], [tmp_path / "wds"], [tmp_path / "hf"], [tmp_path / "hf", "data.streaming=true"]]
    source_keys = {"data.path", "data.dataset", "data.streaming"}
    fitted, reasons = [], []
    for path, *extra in sources:
        cfg, lines = resolve_pretrain_config(None, [f"data.path={path}", *extra], CPU2)
        fitted.append({k: v for k, v in flatten(to_dict(cfg)).items() if k not in source_keys})
        reasons.append([x for x in lines[1:] if "data.dataset=" not in x and "data.holdout=" not in x])
        assert "90 images" in lines[1 + next(i for i, x in enumerate(lines[1:]) if "data.holdout=" in x)]
    assert fitted[0]["data.holdout"] == 0.3 and fitted[0]["model.in_chans"] == 1 and fitted[0]["model.img_size"] == 32
    assert all(f == fitted[0] for f in fitted[1:]) and all(r == reasons[0] for r in reasons[1:])
    assert resolve_pretrain_config(None, [f"data.path={tmp_path}/wds"], CPU2)[0].data.dataset == "wds"


def test_a_dataset_dicts_validation_split_evaluates(tmp_path):
    datasets = pytest.importorskip("datasets")

    folder = _folder(tmp_path / "imgs", 10, side=40)
    files = sorted(folder.glob("*/*.png"))
    rows = {"image": [{"bytes": f.read_bytes(), "path": None} for f in files], "label": [0] * 10 + [1] * 10}
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    part = datasets.Dataset.from_dict(rows, features=feats)
    datasets.DatasetDict({"train": part, "validation": part.select(range(0, 20, 4))}).save_to_disk(str(tmp_path / "d"))
    cfg, lines = resolve_pretrain_config(None, [f"data.path={tmp_path}/d"], CPU2)
    assert cfg.data.val_path == "split:validation" and "data.val_path evaluates" in lines[0]
    assert not any("data.holdout=" in x for x in lines) and "20 training images" in "\n".join(lines)

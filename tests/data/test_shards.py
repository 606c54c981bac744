"""WebDataset shards (data.dataset=wds): the tar conventions, what is skipped and named, the hashed
holdout, ``ibot shards``, detection from ``data.path``, and exact mid-epoch resume on both pipelines."""

import io
import json
import logging
import tarfile

import pytest
import torch
from PIL import Image

from ibot.data.datasets import DatasetError, build_dataset
from ibot.data.loader import EpochSampler
from ibot.data.shard_writer import write_shards
from ibot.data.shards import ShardDataset, expand_braces, key_share, shard_files, split_key


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):  # the shard-index cache of each test is its own
    monkeypatch.setattr("ibot.data.shards.CACHE", tmp_path / "cache")


def _png(color, size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _image_folder(root, n=16, classes=2):
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n // classes):
            color = (40 + 9 * i, 200 - 7 * i, 90 + 80 * c)
            Image.new("RGB", (36 + i % 5, 32), color).save(root / f"c{c}" / f"{i}.png")
    return root


def test_webdataset_key_convention_and_brace_patterns():
    assert split_key("a/b/0001.seg.png") == ("a/b/0001", "seg.png")
    assert split_key("x.JPG") == ("x", "jpg")
    assert expand_braces("s-{08..10}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar"]
    assert expand_braces("{a,b}/s-{0..1}.tar") == ["a/s-0.tar", "a/s-1.tar", "b/s-0.tar", "b/s-1.tar"]
    with pytest.raises(DatasetError, match="runs backwards"):
        expand_braces("s-{5..1}.tar")


def test_wrong_pattern_and_empty_shard_sets_are_one_line_errors(tmp_path):
    _tar(tmp_path / "s-0.tar", [("k.png", _png((1, 2, 3)))])
    with pytest.raises(DatasetError, match=r"names 3 files but 2 do not exist \(first: .*s-1.tar\)"):
        shard_files(tmp_path / "s-{0..2}.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no .tar shards in .*empty.*ibot shards"):
        shard_files(tmp_path / "empty")
    with pytest.raises(DatasetError, match="do not exist"):
        shard_files(tmp_path / "nope")
    _tar(tmp_path / "only_text.tar", [("k.txt", b"hello")])
    with pytest.raises(DatasetError, match="hold no sample with an image"):
        ShardDataset(tmp_path / "only_text.tar")


def test_labels_skips_and_names(tmp_path, caplog):
    members = [
        ("d/000.png", _png((200, 0, 0))),
        ("d/000.cls", b"1\n"),
        ("d/001.jpg", _png((0, 200, 0))),  # a PNG named .jpg decodes anyway (PIL sniffs)
        ("d/001.json", json.dumps({"label": 0}).encode()),
        ("d/002.txt", b"caption without an image"),
        ("d/003.png", b"not a png at all"),
        ("d/003.cls", b"0"),
        ("d/004.webp", _png((0, 0, 200))),
    ]
    _tar(tmp_path / "a.tar", members)
    whole = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "cut").mkdir()
    with tarfile.open(tmp_path / "a.tar") as tf:
        cut_at = tf.getmember("d/004.webp").offset_data + 10
    (tmp_path / "cut" / "b.tar").write_bytes(whole[:cut_at])  # cut inside d/004.webp
    with caplog.at_level(logging.WARNING, logger="ibot"):
        ds = ShardDataset(tmp_path / "a.tar")
        cut = ShardDataset(tmp_path / "cut")
    assert ds.keys == ["d/000", "d/001", "d/003", "d/004"] and ds.labels.tolist() == [1, 0, 0, -1]
    assert ds.skipped == {"no_image": 1, "truncated": []}
    assert "1 sample(s) without an image skipped (first: d/002)" in caplog.text
    assert cut.keys == ["d/000", "d/001", "d/003"] and cut.skipped["truncated"] == ["b.tar"]
    assert "is truncated: its 3 complete samples are used" in caplog.text
    assert ds[0][0].getpixel((0, 0)) == (200, 0, 0) and ds[1][1] == 0
    with caplog.at_level(logging.WARNING, logger="ibot"):
        assert ds[2] is None  # unreadable: skipped by the collate, and named
    assert "skipping unreadable sample a.tar:d/003.png" in caplog.text


def test_hashed_holdout_is_disjoint_nested_and_val_path_wins(tmp_path):
    write_shards(_image_folder(tmp_path / "imgs", n=60), tmp_path / "wds", shard_size=16, progress=False, log=str)
    train = build_dataset("wds", str(tmp_path / "wds"), train=True, holdout=0.2)
    held = build_dataset("wds", str(tmp_path / "wds"), train=False, holdout=0.2)
    assert set(train.keys).isdisjoint(held.keys) and len(train) + len(held) == 60
    assert 4 <= len(held) <= 20 and all(key_share(k) < 0.2 for k in held.keys)
    smaller = build_dataset("wds", str(tmp_path / "wds"), train=False, holdout=0.1)
    assert set(smaller.keys) <= set(held.keys)
    assert held.classes == ["c0", "c1"]  # from index.json
    val = build_dataset("wds", str(tmp_path / "wds"), train=False, val_path=str(tmp_path / "wds/shard-000000.tar"))
    assert len(val) == 16 and "data.val_path" in val.split
    assert len(build_dataset("wds", str(tmp_path / "wds"), train=True, val_path="x")) == 60  # nothing held out


def test_ibot_shards_writes_an_index_the_reader_trusts(tmp_path, capsys):
    from ibot.cli import main

    src = _image_folder(tmp_path / "imgs", n=10)
    assert main(["shards", str(src), "--out", str(tmp_path / "wds"), "--shard-size", "4", "--no-progress"]) == 0
    assert "wrote 10 images" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "wds").iterdir())
    assert names == ["index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    indexed = ShardDataset(tmp_path / "wds")
    (tmp_path / "wds" / "index.json").unlink()
    scanned = ShardDataset(tmp_path / "wds/shard-{000000..000002}.tar")
    assert indexed.samples == scanned.samples and indexed.labels.tolist() == scanned.labels.tolist()
    files = sorted((src / c / f).read_bytes() for c in ("c0", "c1") for f in (src / c).iterdir() if True)
    assert sorted(indexed.read_bytes(i)[0] for i in range(10)) == files  # every image once, bytes unchanged
    assert main(["shards", str(src), "--out", str(tmp_path / "wds")]) == 2  # refuses to mix with old shards


def test_workers_and_ranks_read_each_sample_once(tmp_path):
    write_shards(_image_folder(tmp_path / "imgs", n=24), tmp_path / "wds", shard_size=5, progress=False, log=str)
    ds = ShardDataset(tmp_path / "wds")
    serial = [ds.read_bytes(i)[0] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=lambda b: b)
    ds.read_bytes(0)  # an open descriptor in the parent: forked workers share it (pread has no file position)
    seen = [img.tobytes() for batch in loader for img, _ in batch]
    assert seen == [ds[i][0].tobytes() for i in range(len(ds))] and len(set(serial)) == len(ds)
    ranks = [list(EpochSampler(len(ds), 4, seed=0, epoch=1, rank=r, world=3)) for r in range(3)]
    flat = [i for r in ranks for i in r]
    assert len(flat) == len(set(flat)) == 24


def test_open_shard_files_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr("ibot.data.shards.MAX_OPEN", 2)
    write_shards(_image_folder(tmp_path / "imgs", n=12), tmp_path / "wds", shard_size=2, progress=False, log=str)
    ds = ShardDataset(tmp_path / "wds")
    first = [ds.read_bytes(i)[0] for i in range(len(ds))]
    assert len(ds._fds) == 2 and [ds.read_bytes(i)[0] for i in reversed(range(12))] == first[::-1]


def test_data_path_of_shards_is_detected(tmp_path):
    from ibot.data_setup import folder_overrides

    write_shards(_image_folder(tmp_path / "imgs", n=12), tmp_path / "wds", shard_size=5, progress=False, log=str)
    preset = {"data.dataset": "fashion_mnist", "data.pipeline": "tensor", "model.in_chans": 1, "optim.batch_size": 4}
    for path in (tmp_path / "wds", tmp_path / "wds/shard-{000000..000002}.tar"):
        add, msg = folder_overrides(preset, {"data.path": str(path)})
        assert add == {"data.dataset": "wds", "data.pipeline": "auto", "model.in_chans": 3, "optim.batch_size": 2}
        assert "3 WebDataset shard(s), 12 samples, 2 classes" in msg


def _losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["loss_patch"]) for r in rows if "loss" in r]


@pytest.mark.parametrize("pipeline", ["pil", "gpu"])  # gpu: its worker half, and the device half on the CPU
def test_resumed_mid_epoch_run_on_shards_gives_the_same_losses(tmp_path, pipeline):
    from ibot.config import build_config
    from ibot.train.trainer import Trainer

    write_shards(_image_folder(tmp_path / "imgs", n=40), tmp_path / "wds", shard_size=7, progress=False, log=str)

    def fit(run, steps):
        ov = [f"run.output_dir={run}", "run.progress=false", "run.knn_at_end=false", "data.dataset=wds"]
        ov += [f"data.path={tmp_path}/wds/shard-{{000000..000005}}.tar", f"data.pipeline={pipeline}"]
        ov += ["optim.batch_size=8", "optim.epochs=2", "data.num_workers=1", f"run.max_steps={steps}"]
        tr = Trainer(build_config("smoke", ov), log=lambda *a: None)
        tr.fit()
        tr.data.close()
        return tr

    full = fit(tmp_path / "full", 8)
    assert full.data.niter == 4 and len(full.data.train_set) == 38  # 2 of 40 keys held out (hashed)
    fit(tmp_path / "part", 3)  # stops mid-epoch 1
    fit(tmp_path / "part", 8)  # auto-resume: steps 4.. from the checkpoint
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")  # every loss, bit for bit
    if pipeline == "pil":  # `ibot knn` of the run reads its shards: bank = training keys, queries = held-out keys
        from ibot.eval.protocols import run_knn

        res = run_knn(str(tmp_path / "full"), ks=(3,), log=str)
        assert (res["dataset"], res["n_train"], res["n_test"]) == ("wds", 38, 2) and "hashed" in res["split"]


def test_cli_wrong_pattern_is_one_line(tmp_path, capsys):
    from ibot.cli import main

    _tar(tmp_path / "s-0.tar", [("k.png", _png((1, 2, 3)))])
    code = main(["pretrain", "preset=smoke", f"data.path={tmp_path}/s-{{0..3}}.tar", f"run.output_dir={tmp_path}/r"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "names 4 files but 3 do not exist" in err[0] and "Traceback" not in err[0]


def test_val_path_is_refused_where_it_would_be_ignored():
    from ibot.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="data.val_path is for data.dataset=wds or hf"):
        build_config("smoke", ["data.dataset=imagefolder", "data.path=x", "data.val_path=y"])

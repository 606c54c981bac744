"""Streamed Hugging Face datasets (data.dataset=hf data.streaming=true): the split over ranks and workers,
the seeded order, the holdout, the epoch length, one-line errors, and exact mid-epoch resume."""

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

datasets = pytest.importorskip("datasets")

from ibot.data.datasets import DatasetError  # noqa: E402
from ibot.data.hf import HFImageDataset  # noqa: E402
from ibot.data.hf_stream import HFStream, StreamSource, epoch_steps, row_id, stream_eval_set  # noqa: E402
from ibot.data.shards import key_share  # noqa: E402


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr("ibot.data.hf_stream._EVAL", {})


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (30 + i % 4, 28), (30 + 3 * i, 200 - 2 * i, 60 + 90 * (i % 2))).save(buf, "PNG")
    return buf.getvalue()


def _table(n=40, bad=(), keys=True):
    feats = {"picture": datasets.Image(), "y": datasets.ClassLabel(names=["even", "odd"])}
    rows = {"picture": [{"bytes": b"broken" if i in bad else _png(i), "path": None} for i in range(n)]}
    rows["y"] = [i % 2 for i in range(n)]
    if keys:
        feats["id"], rows["id"] = datasets.Value("string"), [f"img-{i}" for i in range(n)]
    return datasets.Dataset.from_dict(rows, features=datasets.Features(feats))


def _crop(img):  # a module-level transform: DataLoader workers receive it
    return [torch.zeros(1)]


def _rank_order(source, rank, world, workers, batch=4, niter=None, epoch=0, start=0):
    """The row ids rank ``rank`` trains on, batch by batch, through a real DataLoader with ``workers``."""
    n = niter or source.num_rows // (batch * world)
    stream = HFStream(source, _crop, batch_size=batch, niter=n, seed=5, rank=rank, world=world, buffer_size=8)
    stream.set_position(epoch, start)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers, collate_fn=lambda b: b)
    return [[item[2] for item in b] for b in loader]


@pytest.mark.parametrize("kind", ["disk", "parquet", "parquet-few-groups"])
def test_two_ranks_by_two_workers_read_every_row_once_in_a_seeded_order(tmp_path, kind):
    table = _table(64)
    if kind == "disk":  # 4 equal row ranges: one per slot
        table.save_to_disk(str(tmp_path / "ds"))
    else:  # 8 row groups of 8 rows (whole groups per slot), or 2 of 32 (fewer than the slots: rows are dealt)
        table.to_parquet(str(tmp_path / "ds" / "train.parquet"), batch_size=8 if kind == "parquet" else 32)
    source = StreamSource(tmp_path / "ds")
    assert (source.num_rows, source.image_key, source.label_key, source.key_col) == (64, "picture", "y", "id")
    ranks = [_rank_order(source, r, world=2, workers=2) for r in range(2)]
    every = [i for rank in ranks for b in rank for i in b]
    assert [len(r) for r in ranks] == [8, 8] and all(len(b) == 4 for r in ranks for b in r)
    assert sorted(every) == sorted(row_id(f"img-{i}") for i in range(64))  # disjoint and complete
    assert ranks[0] == _rank_order(source, 0, world=2, workers=2)  # seeded: the same order again
    assert ranks[0] != _rank_order(source, 0, world=2, workers=2, epoch=1)  # another epoch, another order
    # a resumed epoch: the DataLoader's first batch (worker 0's) is step 3, which slot 1 reads
    assert _rank_order(source, 0, world=2, workers=2, start=3) == ranks[0][3:]


def test_held_out_keys_are_neither_trained_on_nor_in_the_bank(tmp_path):
    _table(60).save_to_disk(str(tmp_path / "ds"))
    source = StreamSource(tmp_path / "ds")
    held = {f"img-{i}" for i in range(60) if key_share(f"img-{i}") < 0.2}
    assert epoch_steps(source, 4, 1, 0.2) == int(60 * 0.8) // 4
    stream = HFStream(source, _crop, batch_size=4, niter=1, holdout=0.2)
    trained = {row[2] for row, _ in zip(stream.slot_rows(0, 0, 1), range(60 - len(held)), strict=False)}
    assert trained == {f"img-{i}" for i in range(60)} - held
    bank = stream_eval_set(tmp_path / "ds", True, holdout=0.2)
    queries = stream_eval_set(tmp_path / "ds", False, holdout=0.2)
    assert set(queries.keys) == held and set(bank.keys).isdisjoint(held) and len(bank) == 60 - len(held)
    assert queries.classes == ["even", "odd"] and "held-out rows" in queries.split
    mapped = HFImageDataset(tmp_path / "ds")  # the map-style reading holds out the same keys
    assert {k for k in mapped.keys if key_share(k) < 0.2} == held


def test_without_a_key_column_the_row_number_is_the_key_as_when_mapped(tmp_path):
    _table(30, keys=False).to_parquet(str(tmp_path / "pq" / "a.parquet"), batch_size=7)
    source = StreamSource(tmp_path / "pq")
    rows = list(source.rows().iter(batch_size=100))[0]
    assert source.key_col is None and rows["key"] == [str(i) for i in range(30)]
    assert rows["image"][4] == HFImageDataset(tmp_path / "pq").read_bytes(4)[0]


def test_a_stream_without_a_row_count_needs_steps_per_epoch(tmp_path, monkeypatch):
    _table(16).to_parquet(str(tmp_path / "pq" / "a.parquet"))
    hub = datasets.load_dataset("parquet", data_files=str(tmp_path / "pq" / "a.parquet"), streaming=True)
    monkeypatch.setattr("ibot.data.hf_stream._open_hub", lambda name, split: hub["train"])
    source = StreamSource("someone/images")  # a hub name (served here by the local file)
    assert source.kind == "hub" and source.num_rows is None and source.key_col == "id"
    with pytest.raises(DatasetError, match="streams without a row count.*set data.steps_per_epoch=N"):
        epoch_steps(source, 4, 1, 0.1)
    assert epoch_steps(source, 4, 1, 0.1, steps_per_epoch=3) == 3
    ids = sorted(i for b in _rank_order(source, 0, world=1, workers=0, niter=4) for i in b)
    assert ids == sorted(row_id(f"img-{i}") for i in range(16))
    from ibot.recipe import Machine, resolve_pretrain_config

    with pytest.raises(DatasetError, match="streams without a row count, so no recipe can be fitted"):
        resolve_pretrain_config(None, ["data.path=someone/images", "data.streaming=true"], Machine("cpu", 2))
    _table(6, keys=False).to_parquet(str(tmp_path / "nokey.parquet"))  # no key column, no row numbers
    hub = datasets.load_dataset("parquet", data_files=str(tmp_path / "nokey.parquet"), streaming=True)
    monkeypatch.setattr("ibot.data.hf_stream._open_hub", lambda name, split: hub["train"])
    rows = list(StreamSource("someone/keyless").rows().iter(batch_size=10))[0]
    assert rows["key"] == [hashlib.blake2b(b, digest_size=16).hexdigest() for b in rows["image"]]


def test_a_slot_that_runs_out_reads_its_rows_again_in_another_order(tmp_path):
    _table(16).save_to_disk(str(tmp_path / "ds"))
    order = [i for b in _rank_order(StreamSource(tmp_path / "ds"), 0, world=1, workers=0, niter=6) for i in b]
    first, again = order[:16], order[16:]  # 6 steps of 4 from 16 rows: a second pass gives the last 8
    assert sorted(first) == sorted(row_id(f"img-{i}") for i in range(16)) and set(again) <= set(first)
    assert again != first[:8]


def test_missing_paths_and_wrong_columns_are_one_line_errors(tmp_path, capsys):
    from ibot.cli import main

    _table(8).save_to_disk(str(tmp_path / "ds"))
    capsys.readouterr()  # the save's progress bar
    common = ["pretrain", "preset=smoke", "data.dataset=hf", "data.streaming=true", f"run.output_dir={tmp_path}/r"]
    cases = [
        ([f"data.path={tmp_path}/missing"], "does not exist or is neither a save_to_disk folder"),
        ([f"data.path={tmp_path}/ds", "data.image_key=pic"], "data.image_key='pic' is not a column"),
        ([f"data.path={tmp_path}/ds", "data.label_key=nope"], "data.label_key='nope' is not a column"),
        ([f"data.path={tmp_path}/ds", "data.limit=4"], "data.limit is for map-style data"),
    ]
    for extra, needle in cases:
        code = main(common + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    from ibot.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="data.streaming is for data.dataset=hf, not wds"):
        build_config("smoke", ["data.dataset=wds", "data.path=x", "data.streaming=true"])
    with pytest.raises(ConfigError, match="data.steps_per_epoch is for data.streaming=true"):
        build_config("smoke", ["data.dataset=hf", "data.path=x", "data.steps_per_epoch=5"])
    from ibot.builders.data import make_dataloader

    with pytest.raises(DatasetError, match="data.streaming=true trains with `ibot pretrain`"):
        make_dataloader(build_config("smoke", ["data.dataset=hf", f"data.path={tmp_path}/ds", "data.streaming=true"]))


def _losses(run: Path):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["loss_patch"]) for r in rows if "loss" in r]


@pytest.mark.parametrize("pipeline", ["pil", "gpu"])  # gpu: its worker half, and the device half on the CPU
def test_resumed_mid_epoch_stream_gives_the_same_losses(tmp_path, pipeline):
    from ibot.config import build_config
    from ibot.train.trainer import Trainer

    _table(40, bad={7}).save_to_disk(str(tmp_path / "ds"))

    def fit(run, steps, workers=2, log=lambda *a: None):
        ov = [f"run.output_dir={run}", "run.progress=false", "run.knn_at_end=false", "data.dataset=hf"]
        ov += [f"data.path={tmp_path}/ds", "data.streaming=true", f"data.pipeline={pipeline}", "optim.batch_size=4"]
        ov += ["optim.epochs=2", f"data.num_workers={workers}", "data.shuffle_buffer=8", f"run.max_steps={steps}"]
        tr = Trainer(build_config("smoke", ov), log=log)
        tr.fit()
        tr.data.close()
        return tr

    full = fit(tmp_path / "full", 18)
    assert full.data.niter == 9 and full.skipped_images == 2  # 36 of 40 rows a epoch; row 7 in each epoch
    fit(tmp_path / "part", 5)  # stops mid-epoch 1: step 5 is worker 1's slot
    saved = torch.load(tmp_path / "part" / "checkpoint.pth", weights_only=False)["data_position"]
    assert saved == {"epoch": 0, "step_in_epoch": 5, "processes": 1, "workers": 2, "batch": 4, "rows_read": [[12, 8]]}
    if pipeline == "pil":  # another layout mid-epoch cannot continue exactly: said, not silent
        import shutil

        shutil.copytree(tmp_path / "part", tmp_path / "other")
        lines = []
        fit(tmp_path / "other", 6, workers=0, log=lambda *a: lines.append(" ".join(map(str, a))))
        assert any("warning: the stream was read as 1 x 2 x 4" in x and "now 1 x 1 x 4" in x for x in lines), lines
    fit(tmp_path / "part", 18)  # auto-resume: every worker skips the rows its slot had read
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")  # every loss, bit for bit
    if pipeline == "pil":  # the run's k-NN: bank = streamed training rows, queries = held-out rows
        from ibot.eval.protocols import run_knn

        res = run_knn(str(tmp_path / "full"), ks=(3,), log=str)
        assert (res["dataset"], res["n_test"]) == ("hf", 4) and "held-out rows" in res["split"]

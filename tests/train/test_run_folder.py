"""Run folders stay true: each step once after resume / --fresh, short runs log, grouped trackers,
separate curve axes with k-NN marks, text progress, the final summary, and schedule changes refused."""

import csv
import json
import re
import shutil
import sys

import pytest

from ibot.config import build_config
from ibot.io import CheckpointError
from ibot.train.metrics import curve_panels
from ibot.train.trainer import Trainer


def cfg_for(run, *overrides):
    return build_config("smoke", [f"run.output_dir={run}", "run.progress=false", "run.knn_at_end=false", *overrides])


def fit(run, *overrides, resume="auto", log=None):
    lines = []
    Trainer(cfg_for(run, *overrides), log=log or lines.append, resume=resume).fit()
    return lines


def steps(path):
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if "loss" in json.loads(x)]


def tb_steps(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return acc.Tags()["scalars"], [e.step for e in acc.Scalars(tag)]


def test_resume_after_lost_steps_and_fresh_keep_each_step_once(tmp_path):
    run = tmp_path / "run"
    fit(run, "run.max_steps=4", "run.loggers=[tensorboard,csv]")
    shutil.copy(run / "checkpoint.pth", tmp_path / "step4.pth")
    fit(run, "run.max_steps=6", "run.loggers=[tensorboard,csv]")  # steps 5, 6 logged ...
    shutil.copy(tmp_path / "step4.pth", run / "checkpoint.pth")  # ... but their checkpoint is lost
    fit(run, "run.max_steps=7", "run.loggers=[tensorboard,csv]")
    assert steps(run / "metrics.jsonl") == [1, 2, 3, 4, 5, 6, 7]
    with open(run / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6, 7]
    assert tb_steps(run, "loss/total")[1] == [1, 2, 3, 4, 5, 6, 7]
    fit(run, "run.max_steps=2", "run.loggers=[tensorboard,csv]", resume="never")  # --fresh
    assert steps(run / "metrics.jsonl") == [1, 2]
    assert tb_steps(run, "loss/total")[1] == [1, 2]


def test_run_shorter_than_log_every_writes_its_last_step(tmp_path):
    fit(tmp_path, "run.max_steps=3", "run.log_every=10")
    assert steps(tmp_path / "metrics.jsonl") == [3]


def test_tensorboard_tags_are_grouped_without_constants(tmp_path):
    fit(tmp_path, "run.max_steps=2")
    tags, _ = tb_steps(tmp_path, "loss/total")
    for tag in ("loss/total", "loss/cls", "loss/patch", "schedule/lr", "schedule/teacher_temp", "monitor/feature_rank"):
        assert tag in tags, tag
    assert all("/" in t for t in tags)
    assert not [t for t in tags if t.split("/")[-1] in ("feature_dim", "teacher_entropy_max", "time", "epoch")]


def test_curves_put_each_quantity_on_its_own_axis_with_knn_marks(tmp_path):
    fit(tmp_path, "run.knn_every=1")
    panels = dict(curve_panels(tmp_path))
    assert panels["teacher temperature"] == ["teacher_temp", "teacher_patch_temp"]
    assert panels["teacher momentum"] == ["momentum"]  # never on the temperature's axis
    assert panels["k-NN top-1 (%)"] == ["knn_top1"]
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_text_progress_and_final_summary(tmp_path):
    lines = fit(tmp_path, "run.knn_at_end=true", "run.print_every_s=1e9")
    text = "\n".join(lines)
    assert "epoch 1/2 step 4/8 (4/4 in epoch): loss" in text and "epoch 2/2 step 8/8 (4/4 in epoch)" in text
    assert re.search(r"done: 8 steps in [\d.]+ min \([\d.]+ min training, \d+ img/s\); final loss \d\.\d{4}", text)
    knn = r"k-NN top-1 [\d.]+% top-5 [\d.]+% \(k=5, queries: the synthetic test split \(16 images\); 64 bank images\)"
    assert re.search(knn, text)
    files = next(x for x in lines if x.startswith("files in"))
    for name in ("checkpoint.pth", "config.json", "curves.png", "metrics.jsonl", "summary.json", "tb/"):
        assert name in files
    summary = json.loads((tmp_path / "summary.json").read_text())
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-2])  # before the k-NN record
    assert summary["final_loss"] == last["loss"] and summary["final_step"] == 8 and summary["steps"] == 8


def test_last_epoch_bar_reaches_n_of_n(tmp_path, capsys):
    Trainer(cfg_for(tmp_path, "run.progress=true"), log=lambda *a: None).fit()
    err = capsys.readouterr().err
    last_render = [x for x in re.split(r"[\r\n]", err) if x.startswith("epoch 2/2")][-1]
    assert "4/4" in last_render


def test_csv_and_wandb_offline_loggers(tmp_path):
    pytest.importorskip("wandb")
    fit(tmp_path, "run.max_steps=3", "run.loggers=[csv,wandb]", "run.knn_at_end=true")
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 3] and float(rows[2]["loss/total"]) > 0
    assert rows[0]["knn/top1"] == "" and float(rows[-1]["knn/top1"]) >= 0  # the k-NN column came later
    assert "schedule/lr" in rows[0] and "feature_dim" not in str(rows[0])
    run_id = (tmp_path / "wandb_id").read_text().strip()
    offline = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline and list(offline[0].glob("*.wandb"))[0].stat().st_size > 0
    assert not (tmp_path / "tb").exists()  # tensorboard was not asked for


def test_unknown_or_missing_logger_is_a_config_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="run.loggers has 'mlflow'"):
        build_config("smoke", ["run.loggers=[mlflow]"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    from ibot.cli import main

    assert main(["pretrain", "preset=smoke", f"run.output_dir={tmp_path}", "run.loggers=[wandb]"]) == 2
    assert "wandb is not installed: pip install 'ibot[wandb]'" in capsys.readouterr().err


def test_extending_epochs_needs_an_explicit_schedule_change(tmp_path):
    fit(tmp_path)  # 2 epochs x 4 steps: finished
    with pytest.raises(CheckpointError, match=r"optim.epochs 2 -> 4.*run.allow_schedule_change=true"):
        fit(tmp_path, "optim.epochs=4")
    lines = fit(tmp_path, "optim.epochs=4", "run.allow_schedule_change=true")
    assert any(x.startswith("schedules changed (optim.epochs 2 -> 4): at step 8 the lr would go") for x in lines)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 17))
    new = Trainer(cfg_for(tmp_path / "ref", "optim.epochs=4"), log=lambda *a: None)
    assert rows[8]["lr"] == pytest.approx(new.schedules[8].lr)  # step 9 follows the 4-epoch schedule

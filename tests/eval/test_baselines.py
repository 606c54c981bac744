"""Baselines beside every score: raw pixels and the untrained model, on the same split and protocol."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ibot.builders.data import dataset_from_config
from ibot.cli import main
from ibot.config import build_config, to_dict
from ibot.data.datasets import default_holdout, stratified_holdout, synthetic_dataset
from ibot.data.transforms import norm_stats
from ibot.eval.baselines import binomial_se, no_gain_warning, pixel_encoder, score_line, untrained_backbone
from ibot.eval.knn import extract_features, knn_classify
from ibot.eval.protocols import _linear_probe, pretrain_split, run_knn, run_linear
from ibot.train.trainer import Trainer


def smoke(run, *extra):
    return build_config("smoke", [f"run.output_dir={run}", "run.progress=false", "optim.epochs=1", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short smoke run with its end-of-run k-NN and baselines (and its printed lines)."""
    folder = tmp_path_factory.mktemp("bl") / "run"
    lines = []
    trainer = Trainer(smoke(folder), log=lines.append)
    result = trainer.fit()
    return folder, trainer, result, lines


def test_pixel_features_are_the_normalised_flattened_images():
    ds = synthetic_dataset(12, 16, 3, seed=5)
    feats, labels = extract_features(pixel_encoder, ds, image_size=16, in_chans=3, batch_size=5)
    mean, std = (torch.tensor(s).view(1, -1, 1, 1) for s in norm_stats(3))
    want = F.normalize(((ds.images.float() / 255 - mean) / std).flatten(1), dim=-1)
    assert feats.shape == (12, 3 * 16 * 16) and torch.allclose(feats, want, atol=1e-6)
    assert torch.equal(labels, ds.labels)


def test_untrained_backbone_is_the_runs_initial_teacher_and_leaves_the_random_stream(tmp_path):
    cfg = smoke(tmp_path / "r", "run.seed=3")
    teacher = Trainer(cfg, resume="never").model.teacher["backbone"].state_dict()
    state = torch.get_rng_state()
    backbone, what = untrained_backbone(to_dict(cfg))
    assert torch.equal(state, torch.get_rng_state()) and what == "untrained (seed 3)"
    assert all(torch.equal(teacher[k].cpu(), v) for k, v in backbone.state_dict().items())
    other, _ = untrained_backbone(to_dict(smoke(tmp_path / "r", "run.seed=4")))
    o = other.state_dict()
    assert not all(torch.equal(teacher[k].cpu(), v) for k, v in o.items())  # the seed matters


def test_pretrain_reports_both_baselines_on_the_knn_split(run):
    folder, trainer, result, lines = run
    knn = result["knn"]
    base = knn["baselines"]
    assert set(base) == {"untrained", "pixels"} and base["pixels"]["k"] == knn["k"]
    # the pixels score is the k-NN of the normalised flattened images, bank = train split, queries = held out
    bank, test, _ = pretrain_split(trainer.cfg, trainer.data.bank_set)
    kw = dict(image_size=trainer.cfg.model.img_size, in_chans=trainer.cfg.model.in_chans)
    (bf, by), (qf, qy) = extract_features(pixel_encoder, bank, **kw), extract_features(pixel_encoder, test, **kw)
    top1 = knn_classify(bf, by, qf, qy, ks=[knn["k"]], temperature=trainer.cfg.run.knn_temperature)[knn["k"]][0]
    assert base["pixels"]["top1"] == top1
    assert json.loads((folder / "summary.json").read_text())["knn"]["baselines"] == base
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("knn_untrained_top1") == base["untrained"]["top1"] for r in metrics)
    assert (folder / "baselines.json").is_file()
    shown = [line for line in lines if line.startswith("k-NN ") and "| untrained" in line]
    assert shown == [score_line("k-NN", knn["top1"], knn["n_test"], base) + f" (k={knn['k']}, {knn['n_test']} queries)"]
    warn = no_gain_warning(knn["top1"], base, trainer.cfg)  # the end-of-run warning is the one it calls for
    assert [
        line for line in lines if "nothing was learned" in line or "raw pixels beat" in line or "note:" in line
    ] == ([f"at the end of the run: {warn}"] if warn else [])


def test_knn_cli_reuses_cached_baselines_and_turns_them_off(run, capsys):
    folder = run[0]
    cache = folder / "baselines.json"
    before = set(json.loads(cache.read_text()))
    first = run_knn(folder, ks=(5,), log=lambda m: None)
    entries = json.loads(cache.read_text())
    assert len(entries) == len(before) + 2  # pixels and untrained for this protocol, beside the run's two
    for key, value in entries.items():  # a planted value proves the second call reads the cache
        if key not in before and '"pixels"' in key:
            value["5"]["top1"] = 12.5
    cache.write_text(json.dumps(entries))
    notes = []
    second = run_knn(folder, ks=(5,), log=notes.append)
    assert second["baselines"]["pixels"]["5"]["top1"] == 12.5 != first["baselines"]["pixels"]["5"]["top1"]
    assert any(n.startswith("baselines: reusing untrained, pixels") for n in notes)
    capsys.readouterr()
    assert main(["knn", str(folder), "--ks", "5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "k-NN k=5 " in out and "| pixels 12.5% (" in out
    assert main(["knn", str(folder), "--ks", "5", "--no-progress", "--no-baselines"]) == 0
    assert "| untrained" not in capsys.readouterr().out


def test_linear_baselines_run_the_same_probe_on_pixels(run):
    folder, trainer = run[0], run[1]
    res = run_linear(folder, epochs=2, n_last_blocks=1, log=lambda m: None)
    base = res["baselines"]
    assert set(base) == {"pixels", "untrained"} and base["pixels"]["n_val"] == res["n_val"]
    train = trainer.data.bank_set
    test = dataset_from_config(trainer.cfg, train=False)
    kw = dict(image_size=trainer.cfg.model.img_size, in_chans=trainer.cfg.model.in_chans)
    (tx, ty), (qx, qy) = extract_features(pixel_encoder, train, **kw), extract_features(pixel_encoder, test, **kw)
    want = _linear_probe(tx, ty, qx, qy, 4, val_fraction=0.1, epochs=2, seed=0, progress=False)
    assert base["pixels"] == want


def test_an_export_gets_pixels_and_a_note_instead_of_the_untrained_model(run, tmp_path, capsys):
    assert main(["export", str(run[0]), "--out", str(tmp_path / "export")]) == 0
    notes = []
    res = run_knn(tmp_path / "export", dataset="synthetic", ks=(5,), log=notes.append)
    assert set(res["baselines"]) == {"pixels"}
    assert any(n.startswith("baselines: untrained skipped (") and "no run config" in n for n in notes)


def test_run_baselines_false_computes_none(tmp_path, capsys):
    result = Trainer(smoke(tmp_path / "r", "run.baselines=false", "run.max_steps=1")).fit()
    assert "baselines" not in result["knn"] and not (tmp_path / "r" / "baselines.json").exists()
    assert "| untrained" not in capsys.readouterr().out


def test_score_line_format_and_standard_error():
    base = {"untrained": {"top1": 100 * 43 / 60}, "pixels": {"top1": 100 * 50 / 60}}
    line = score_line("k-NN", 100 * 47 / 60, 60, base)
    assert line == "k-NN 78.3% ± 5.3 | untrained 71.7% (+6.7) | pixels 83.3% (-5.0)"
    assert binomial_se(50.0, 100) == pytest.approx(5.0)
    edge = binomial_se(100.0, 18)  # never a certain 100%: as if half an image were wrong
    assert edge > 0 and edge == pytest.approx(binomial_se(100 * 17.5 / 18, 18))
    assert score_line("linear", 78.3, 5000, {}) == "linear 78.3%"  # a large split: no standard error
    assert score_line("k-NN", 60.0, 50, {"untrained": "skipped"}) == "k-NN 60.0% ± 6.9"


def test_no_gain_warning_fires_within_a_point_of_untrained_only():
    cfg = build_config("smoke")
    base = {"untrained": {"top1": 71.67}, "pixels": {"top1": 74.0}}
    warn = no_gain_warning(72.0, base, cfg)
    assert warn.startswith("warning: nothing was learned") and "optim.epochs=4" in warn and "now 0.001" in warn
    assert no_gain_warning(76.67, base, cfg) is None  # +5 over untrained, 2.7 over pixels
    pixels = no_gain_warning(76.67, {**base, "pixels": {"top1": 90.0}}, cfg)
    assert pixels.startswith("warning: raw pixels beat the model by 13.3 points")
    assert no_gain_warning(40.0, {}, cfg) is None  # no baselines: nothing to compare
    ceiling = no_gain_warning(100.0, {"untrained": {"top1": 100.0}}, cfg)
    assert ceiling.startswith("note: the untrained model already scores 100.0%")  # not "nothing was learned"


def test_knn_data_detects_an_imagefolder_and_linear_prints_the_lr_with_its_meaning(run, tmp_path, capsys):
    from PIL import Image

    for c in ("a", "b"):  # the run trained on synthetic images; --data names a labelled folder
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (16, 16), (25 * i, 200 if c == "a" else 0, 0)).save(tmp_path / "imgs" / c / f"{i}.png")
    args = ["--data", str(tmp_path / "imgs"), "--no-progress", "--no-baselines"]
    assert main(["knn", str(run[0]), "--ks", "3", *args]) == 0
    out, err = capsys.readouterr()
    assert "an ImageFolder with 2 classes" in err and "held-out 2 of 20" in out
    assert main(["linear", str(run[0]), "--epochs", "2", "--n-last-blocks", "1", *args]) == 0
    out = capsys.readouterr().out
    assert "(SGD base lr, scaled by batch/256; picked among 45 on 2 validation images" in out
    lr = out.split("): lr ")[1].split(" ")[0]
    assert float(lr) > 0 and lr[-1].isdigit()


def test_default_holdout_keeps_about_200_images_for_small_folders():
    assert default_holdout(600) == 0.3 and default_holdout(1000) == 0.2 and default_holdout(5000) == 0.1
    assert default_holdout(2000) == 0.1 and default_holdout(0) == 0.1
    labels = torch.arange(6).repeat_interleave(100)  # 600 images, 6 classes
    assert len(stratified_holdout(labels, default_holdout(600))[1]) == 180
    assert math.isclose(default_holdout(1500), 200 / 1500)

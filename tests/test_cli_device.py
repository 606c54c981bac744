"""``--device`` on every evaluation / export / viz command, ``ibot finetune`` from the command line,
and the export check."""

import json

import pytest
import torch

from ibot.cli import build_parser, main
from ibot.config import build_config
from ibot.device import DeviceError, resolve_device
from ibot.train.trainer import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = build_config(
        "smoke", [f"run.output_dir={out}", "run.progress=false", "run.knn_at_end=false", "run.max_steps=2"]
    )
    Trainer(cfg, log=lambda *a: None).fit()
    return out


@pytest.mark.parametrize(
    "argv",
    [
        ["knn", "R"],
        ["linear", "R"],
        ["finetune", "R"],
        ["export", "R", "--out", "X"],
        ["viz", "attention", "R"],
        ["viz", "patterns", "R"],
        ["viz", "correspond", "R"],
    ],
)
def test_every_model_command_takes_device_defaulting_to_auto(argv):
    p = build_parser()
    assert p.parse_args(argv).device == "auto"
    assert p.parse_args([*argv, "--device", "cuda:1"]).device == "cuda:1"


def test_auto_is_cuda_when_present(monkeypatch):
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device(None) == torch.device("cuda")
    with pytest.raises(DeviceError, match="does not exist"):
        resolve_device("cuda:3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_missing_cuda_is_a_one_line_error(run, capsys):
    assert main(["knn", str(run), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ibot: error:") and "--device cpu" in err[-1]
    assert main(["knn", str(run), "--device", "tpu"]) == 2
    assert "use auto, cpu, cuda" in capsys.readouterr().err


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_knn_and_linear_run_on_the_device_they_report(run, capsys, monkeypatch, device):
    """The backbone's weights and every image batch it sees are on ``--device``, which the result names
    (a spy on the backbone's forward, not only the echoed name)."""
    import ibot.eval.protocols as protocols

    seen = set()
    load = protocols.load_backbone

    def spied(*args, **kwargs):
        backbone, info, report = load(*args, **kwargs)

        def record(module, inputs):
            seen.update({("input", x.device.type) for x in inputs if torch.is_tensor(x)})
            seen.update({("weights", p.device.type) for p in module.parameters(recurse=False)})

        for module in backbone.modules():  # every layer: linear features use intermediate blocks, not forward
            if not list(module.children()):
                module.register_forward_pre_hook(record)
        return backbone, info, report

    monkeypatch.setattr(protocols, "load_backbone", spied)
    assert main(["knn", str(run), "--device", device, "--ks", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["device"] == device and res["knn"]["5"]["top1"] > 0
    assert seen == {("input", device), ("weights", device)}
    seen.clear()
    assert main(["linear", str(run), "--device", device, "--epochs", "1", "--n-last-blocks", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["device"] == device and res["n_last_blocks"] == 1
    assert seen == {("input", device), ("weights", device)}


def test_finetune_runs_from_the_command_line(run, capsys):
    argv = ["finetune", str(run), "--device", "cpu", "--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "fine-tuned (tiny_cpu, 1 epochs) on synthetic" in out.out
    res = json.loads(out.out.strip().splitlines()[-1])
    assert res["epochs"] == 1 and res["hyperparameters"]["lr"] == 1e-3 and res["hyperparameters"]["batch_size"] == 16
    assert "finetune epoch 1/1" in out.err


def test_export_check_reloads_with_plain_timm(run, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", str(run), "--out", str(out), "--check", "--device", "cpu"]) == 0
    assert "features match the backbone" in capsys.readouterr().out
    from safetensors.torch import load_file, save_file

    from ibot.builders.sources import load_backbone
    from ibot.export import check_export
    from ibot.io import CheckpointError

    sd = load_file(str(out / "backbone.safetensors"))
    sd["norm.weight"] = sd["norm.weight"] * 2  # a wrong export must be caught
    save_file(sd, str(out / "backbone.safetensors"))
    backbone = load_backbone(run)[0]
    with pytest.raises(CheckpointError, match="does not reproduce"):
        check_export(backbone, out, "cpu")


def test_viz_runs_on_the_requested_device(run, tmp_path):
    assert main(["viz", "attention", str(run), "--out", str(tmp_path / "a.png"), "--n", "2", "--device", "cpu"]) == 0
    assert (tmp_path / "a.png").stat().st_size > 0


def test_finetune_on_an_image_folder_decodes_it_and_tests_on_held_out_images(run, tmp_path, capsys):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c in range(2):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(10):
            px = (torch.rand(32, 32, 3, generator=gen) * 60 + 150 * c).to(torch.uint8).numpy()
            Image.fromarray(px).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    argv = ["finetune", str(run), "--dataset", "imagefolder", "--data", str(tmp_path / "imgs"), "--device", "cpu"]
    assert main([*argv, "--epochs", "1", "--batch-size", "8", "--json"]) == 0
    out = capsys.readouterr()
    assert "decoding 18 + 2 images into memory" in out.err  # 10% of each class held out, never trained on
    assert "finetune: batch 8, 1 epochs x 2 steps" in out.err  # what was fitted and why, in one line
    line = out.out.strip().splitlines()[0]
    assert "on held-out 2 of 20 images of" in line  # the split it tested on
    assert line.endswith("(mixup off, cutmix off, smoothing 0.1: 18 training images)")
    assert json.loads(out.out.strip().splitlines()[-1])["epochs"] == 1
    assert main([*argv, "--epochs", "1", "--mixup", "0.8", "--cutmix", "1", "--smoothing", "0"]) == 0
    assert "(mixup 0.8, cutmix 1, smoothing off: 18 training images)" in capsys.readouterr().out


def test_finetune_help_names_folders_and_the_switches(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ImageFolder" in text and "one sub-folder per class" in text and "held out of each class" in text
    assert all(f"--{k}" in text for k in ("mixup", "cutmix", "smoothing"))
    with pytest.raises(SystemExit, match="2"):  # a one-line usage error
        main(["finetune", "R", "--smoothing", "1.5"])
    assert "--smoothing: 1.5 is not in [0, 1)" in capsys.readouterr().err

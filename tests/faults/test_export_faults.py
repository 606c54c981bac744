"""Files from elsewhere and bad evaluation arguments: exports, caches, images and flags."""

import json
import shutil
import struct

import pytest


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A one-step smoke run and its export."""
    from ibot.cli import main

    root = tmp_path_factory.mktemp("exp")
    ov = [f"run.output_dir={root / 'run'}", "run.progress=false", "run.knn_at_end=false", "run.max_steps=1"]
    assert main(["pretrain", "preset=smoke", *ov]) == 0
    assert main(["export", str(root / "run"), "--out", str(root / "export")]) == 0
    return root


@pytest.fixture
def export(exported, tmp_path):
    shutil.copytree(exported / "export", tmp_path / "export")
    return tmp_path / "export"


def _meta(export, **changes):
    meta = json.loads((export / "backbone.json").read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    (export / "backbone.json").write_text(json.dumps(meta))
    return meta


def test_export_loads_back(export, cli):
    code, out, _ = cli("knn", export, "--dataset", "synthetic", "--ks", "5")
    assert code == 0 and "k=  5" in out


def test_missing_backbone_json(export, cli):
    (export / "backbone.json").unlink()
    cli.fails("knn", export / "backbone.safetensors", "--dataset", "synthetic", needles=["has no backbone.json"])


def test_backbone_json_not_json(export, cli):
    (export / "backbone.json").write_text("{not json")
    cli.fails("knn", export, "--dataset", "synthetic", needles=["not valid JSON"])


@pytest.mark.parametrize(
    "arch", ["hf-hub:timm/vit_small_patch16_224.augreg_in21k", "local-dir:/tmp/model", "vit_small_patch16_224.dino"]
)
def test_arch_must_be_a_plain_timm_name(export, cli, arch):
    _meta(export, arch=arch)
    cli.fails("knn", export, "--dataset", "synthetic", needles=["not a plain timm model name", "refusing"])


@pytest.mark.parametrize("extra", [{"pretrained": True}, {"checkpoint_path": "/x.pth"}, {"pretrained_cfg_overlay": {}}])
def test_timm_kwargs_cannot_fetch_or_load_files(export, cli, extra):
    meta = json.loads((export / "backbone.json").read_text())
    _meta(export, timm_kwargs={**meta["timm_kwargs"], **extra})
    cli.fails("knn", export, "--dataset", "synthetic", needles=["refusing"])


def test_safetensors_header_claiming_a_huge_tensor(export, cli):
    header = {"cls_token": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 4 * 10**12]}}
    blob = json.dumps(header).encode()
    (export / "backbone.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 64)
    cli.fails("knn", export, "--dataset", "synthetic", needles=["not a readable safetensors file"])
    (export / "backbone.safetensors").write_bytes(b"\xff" * 8 + b"junk")
    cli.fails("knn", export, "--dataset", "synthetic", needles=["not a readable safetensors file"])


def test_json_describing_another_model(export, cli):
    meta = json.loads((export / "backbone.json").read_text())
    _meta(export, timm_kwargs={**meta["timm_kwargs"], "embed_dim": 4096, "depth": 48})  # not built: checked first
    cli.fails("knn", export, "--dataset", "synthetic", needles=["does not match its backbone.json"])


def test_corrupt_feature_cache_is_recomputed(exported, tmp_path, cli):
    cache = tmp_path / "feats.pt"
    cache.write_bytes(b"garbage, not a torch file")
    code, out, err = cli("knn", exported / "run", "--ks", "5", "--cache", cache)
    assert code == 0 and "unreadable" in err and "recomputing" in err
    code, _, err = cli("knn", exported / "run", "--ks", "5", "--cache", cache)
    assert code == 0 and "reusing cache" in err  # rewritten correctly
    cli.fails("knn", exported / "run", "--cache", tmp_path, needles=["is a folder"])


def test_bad_knn_arguments(exported, cli):
    run = exported / "run"
    cli.fails("knn", run, "--ks", "0", needles=["every k >= 1"])
    cli.fails("knn", run, "--ks", "10", "-3", needles=["every k >= 1"])
    cli.fails("knn", run, "--temperature", "0", needles=["--temperature"])
    cli.fails("knn", run, "--img-size", "30", needles=["--img-size 30", "patch size 8"])
    cli.fails("knn", exported / "nothing", needles=["does not exist"])


def test_export_out_is_an_existing_file(exported, tmp_path, cli):
    (tmp_path / "taken").write_text("keep me")
    cli.fails("export", exported / "run", "--out", tmp_path / "taken", needles=["is a file"])
    assert (tmp_path / "taken").read_text() == "keep me"


def test_viz_images_missing_or_not_images(exported, tmp_path, cli):
    run = exported / "run"
    out = tmp_path / "att.png"
    cli.fails("viz", "attention", run, "--images", tmp_path / "missing.png", "--out", out, needles=["missing.png"])
    (tmp_path / "notes.png").write_text("text")
    cli.fails("viz", "attention", run, "--images", tmp_path / "notes.png", "--out", out, needles=["cannot read"])
    assert not out.exists()


def test_viz_curves_of_a_folder_without_metrics(tmp_path, cli):
    code, _, err = cli("viz", "curves", tmp_path)
    assert code == 2 and "no metrics.jsonl" in err

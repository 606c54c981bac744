"""``benchmarks/gpu_check.py --device cpu``: the prepared GPU check runs end to end as a smoke."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(autouse=True)
def _restore_compile_backend():
    from ibot.train import compiled

    backend = compiled.BACKEND
    yield
    compiled.BACKEND = backend


def test_gpu_check_sections_a_to_e_on_cpu(tmp_path, capsys):
    import gpu_check

    out = tmp_path / "gpu-smoke.json"
    assert gpu_check.main(["--device", "cpu", "--only", "a", "b", "c", "d", "e", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["quick"] and res["device_name"] == "cpu"
    # (a) CPU fp32 against the CPU fp64 reference: two computations that agree within the tolerance
    # (a difference of 0 would mean both sides ran the same code in the same precision)
    a = res["a_parity"]
    assert a["ok"] and 0 < a["rel_loss"] <= a["tolerance"] and 0 < a["rel_grads_max"] <= a["tolerance"]
    assert a["loss_reference_fp64"] != a["loss_device"]
    b = res["b_bf16"]
    assert b["ok"] and 0 < b["rel"] <= b["tolerance"]  # bf16 autocast really changed the numbers
    runs = res["c_throughput"]["runs"]
    assert runs["ibot eager"]["images_per_s"] > 0 and runs["ibot compiled (full)"]["images_per_s"] > 0
    assert "skipped" in runs["official"]  # no official source here
    d = res["d_loader"]
    assert "skipped" in d or "end_to_end_ips" in d
    assert "skipped" in d or (d["end_to_end_target"] == 0.9 and isinstance(d["end_to_end_ok"], bool))
    assert res["e_knn"]["images"] == 80 and res["e_knn"]["extract_images_per_s"] > 0
    table = capsys.readouterr().out
    for title in ("(a) device fp32 vs CPU fp64", "(b) bf16", "(c) ViT-S/16", "(d) loader", "(e) k-NN"):
        assert title in table


def test_gpu_check_torchrun_fsdp_smoke(tmp_path):
    import gpu_check

    res = gpu_check.check_torchrun(gpu_check.torch.device("cpu"))
    assert res["ok"], res
    assert res["backend"] == "gloo" and res["world_size"] == 1 and len(res["losses"]) == 2


def test_gpu_check_no_sync_section_skips_on_cpu_and_its_steps_run(tmp_path, monkeypatch):
    """(g) is skipped without CUDA; its loop (warm-up, then steps with the sync check on, then off)
    runs the real trainer's steps, here on the CPU with the CUDA calls recorded."""
    import gpu_check

    from ibot.config import build_config
    from ibot.train.trainer import Trainer

    assert "skipped" in gpu_check.check_no_sync(gpu_check.torch.device("cpu"), True)
    modes = []
    monkeypatch.setattr(gpu_check.torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(gpu_check.torch.cuda, "synchronize", lambda device=None: None)
    over = [f"run.output_dir={tmp_path}", "run.progress=false", "optim.batch_size=4", "loss.centering=sinkhorn"]
    tr = Trainer(build_config("smoke", over), log=lambda *a: None)
    res = gpu_check._steps_under_sync_error(tr, 3)
    assert res["ok"] and res["steps"] == 3 and res["bad"] == 0, res
    assert modes == ["error", 0]

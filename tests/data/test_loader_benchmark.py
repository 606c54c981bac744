"""Smoke of benchmarks/loader_throughput.py: the interface benchmarks/gpu_check.py calls, and --quick."""

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("loader_throughput", ROOT / "benchmarks" / "loader_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_loader_figures_on_cpu(bench, tmp_path):
    fig = bench.loader_figures(
        "cpu", 0, 24, batch_size=8, step_repeats=1, preset="smoke", image_size=(40, 30), data_dir=tmp_path
    )
    assert (fig["device"], fig["num_workers"], fig["n_images"], fig["batch_size"]) == ("cpu", 0, 24, 8)
    assert fig["timed_images"] == {"loader": 24, "end_to_end": 24} and fig["steps_per_epoch"] == 3
    keys = ("loader_ips", "loader_after_fill_ips", "step_ips", "end_to_end_ips", "end_to_end_after_fill_ips")
    for key in (*keys, "device_half_ms_per_image"):
        assert math.isfinite(fig[key]) and fig[key] > 0, key
    assert fig["end_to_end_over_step"] == pytest.approx(fig["end_to_end_ips"] / fig["step_ips"])
    assert len(list(tmp_path.rglob("*.jpg"))) == 24


def test_quick_mode_prints_every_row(bench, tmp_path, capsys):
    bench.main(["--quick", "--data", str(tmp_path), "--out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    for row in ("ibot_pil", "ibot_worker", "ibot_worker_pil", "decode_tv", "device_cpu", "cores per GPU"):
        assert row in out
    assert "official: skipped" in out  # no --official-src
    assert (tmp_path / "r.json").is_file()

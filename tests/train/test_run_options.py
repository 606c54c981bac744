"""Run options of ``ibot pretrain`` that change what a run does: each checked by its effect."""

import json

import pytest
import torch

from ibot.config import build_config
from ibot.data.loader import EpochSampler
from ibot.io import load_safe, save_atomic
from ibot.train.trainer import Trainer


def smoke_cfg(tmp_path, *overrides):
    return build_config(
        "smoke", [f"run.output_dir={tmp_path}", "run.progress=false", "run.knn_at_end=false", *overrides]
    )


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_knn_every_saveckp_freq_and_knn_split_val(tmp_path):
    # 3 epochs of 4 steps: k-NN after epochs 1 and 2 (not after the last: knn_at_end does that);
    # checkpoint0002.pth kept (epochs e > 0 with e % 2 == 0, as the official saveckp_freq)
    cfg = smoke_cfg(tmp_path, "optim.epochs=3", "run.knn_every=1", "run.saveckp_freq=2", "run.knn_split=val")
    Trainer(cfg, log=lambda *a: None).fit()
    rows = [json.loads(x) for x in (tmp_path / "knn.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 4), (2, 8)]
    # val split: the last fifth of the 64 training images are the queries, the rest the memory bank
    assert {(r["n_train"], r["n_test"]) for r in rows} == {(52, 12)}
    kept = sorted(p.name for p in tmp_path.glob("checkpoint*.pth"))
    assert kept == ["checkpoint.prev.pth", "checkpoint.pth", "checkpoint0002.pth"]  # the last two + epoch 2
    ckpt = load_safe(tmp_path / "checkpoint0002.pth")
    assert (ckpt["epoch"], ckpt["global_step"]) == (3, 12)


def test_time_limit_stops_after_the_step_that_crosses_it(tmp_path):
    lines = []
    tr = Trainer(smoke_cfg(tmp_path, "run.time_limit_min=1e-9"), log=lines.append)
    tr.fit()
    assert tr.global_step == 1  # every step takes longer than the limit
    assert any("time limit of 1e-09 min reached at step 1" in m for m in lines)
    ckpt = load_safe(tmp_path / "checkpoint.pth")  # saved where it stopped, resumable
    assert (ckpt["global_step"], ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 0, 1)


def test_epoch_sampler_ranks_are_disjoint_and_cover_the_epoch():
    n, b, w = 103, 5, 3
    per_rank = [list(EpochSampler(n, b, seed=1, epoch=4, rank=r, world=w)) for r in range(w)]
    steps = n // (b * w)
    assert all(len(idx) == steps * b for idx in per_rank)
    flat = [i for idx in per_rank for i in idx]
    assert len(set(flat)) == len(flat) == steps * b * w  # no image on two ranks
    # step s of rank r is slice r of global batch s of the (seed, epoch) permutation
    single = list(EpochSampler(n, b * w, seed=1, epoch=4))
    for s in range(steps):
        glob = single[s * b * w : (s + 1) * b * w]
        for r in range(w):
            assert per_rank[r][s * b : (s + 1) * b] == glob[r * b : (r + 1) * b]
    assert list(EpochSampler(n, b, seed=1, epoch=5)) != list(EpochSampler(n, b, seed=1, epoch=4))


def test_epoch_sampler_position_after_a_world_size_change():
    # 2 ranks trained 3 steps of batch 4 (24 images); 1 rank resumes at step 3 * 2 // 1 = 6 of batch 4
    n, b = 64, 4
    seen = [i for r in range(2) for i in list(EpochSampler(n, b, 0, 0, r, 2))[: 3 * b]]
    rest = list(EpochSampler(n, b, 0, 0, 0, 1, start_batch=6))
    assert not set(seen) & set(rest)
    assert sorted(seen + rest) == list(range(n))  # the epoch finishes every image exactly once


@pytest.mark.parametrize("step,new_step", [(1, 2), (3, 4)])
def test_resume_with_another_world_size_converts_the_position(tmp_path, step, new_step):
    Trainer(smoke_cfg(tmp_path, f"run.max_steps={step}"), log=lambda *a: None).fit()
    path = tmp_path / "checkpoint.pth"
    ckpt = load_safe(path)
    ckpt["world_size"] = 2  # as if written by `torchrun --nproc_per_node 2` (global batch 2 x 16)
    save_atomic(ckpt, path)
    tr = Trainer(smoke_cfg(tmp_path), log=lambda *a: None)
    # step s of 32 images -> step 2s of 16 in one process, capped at the epoch's 4 steps
    assert (tr.step_in_epoch, tr.global_step) == (new_step, step)


def test_grad_checkpointing_gives_the_same_losses(tmp_path):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    Trainer(smoke_cfg(plain, "run.max_steps=3"), log=lambda *a: None).fit()
    tr = Trainer(smoke_cfg(ckpt, "run.max_steps=3", "run.grad_checkpointing=true"), log=lambda *a: None)
    assert tr.model.student["backbone"].timm_model.grad_checkpointing
    tr.fit()
    # drop-path randomness is replayed in the recomputation, so even the updates agree
    assert _losses(ckpt) == pytest.approx(_losses(plain), rel=1e-6, abs=1e-6)
    a, b = load_safe(plain / "checkpoint.pth")["model"], load_safe(ckpt / "checkpoint.pth")["model"]
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-5, atol=1e-6, msg=k)


def _compile_works() -> bool:
    try:
        f = torch.compile(lambda x: torch.sin(x) + 1)
        f(torch.randn(4))
        return True
    except Exception:  # noqa: BLE001 - no C++ compiler, unsupported platform, ...
        return False


@pytest.mark.slow
def test_compile_gives_the_same_losses(tmp_path):
    if not _compile_works():
        pytest.skip("torch.compile is unavailable here")
    plain, comp = tmp_path / "plain", tmp_path / "comp"
    Trainer(smoke_cfg(plain, "run.max_steps=2"), log=lambda *a: None).fit()
    tr = Trainer(smoke_cfg(comp, "run.max_steps=2", "run.compile=true"), log=lambda *a: None)
    assert all(blk._compiled_call_impl is not None for blk in tr.model.student["backbone"].blocks)
    tr.fit()
    assert _losses(comp) == pytest.approx(_losses(plain), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_run_checkpoints_its_grad_scaler(tmp_path, precision):
    Trainer(smoke_cfg(tmp_path, "run.max_steps=2", f"run.precision={precision}"), log=lambda *a: None).fit()
    saved = load_safe(tmp_path / "checkpoint.pth")["scaler"]
    assert all(torch.isfinite(torch.tensor(x)) for x in _losses(tmp_path))
    if precision == "bf16":
        assert saved is None  # bf16 needs no loss scaling
        return
    assert saved["scale"] < 2.0**16  # the first steps overflowed the tiny head in fp16 and backed off
    tr = Trainer(smoke_cfg(tmp_path, f"run.precision={precision}"), log=lambda *a: None)
    assert tr.scaler.get_scale() == saved["scale"] and tr.global_step == 2  # resumed with its scale

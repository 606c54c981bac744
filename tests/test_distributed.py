"""DDP equivalence: 2 gloo processes x batch B == 1 process x batch 2B (same samples, same masks)."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import step_values, tiny_ibot

from ibot.data.loader import Batch
from ibot.data.masking import MaskBatch

B, G, L = 4, 2, 2


def _inputs():
    gen = torch.Generator().manual_seed(0)
    glob = torch.randn(G, 2 * B, 3, 32, 32, generator=gen)
    loc = torch.randn(L, 2 * B, 3, 16, 16, generator=gen)
    masks = torch.rand(G, 2 * B, 16, generator=gen) < 0.3
    masks[0, 0] = False
    return glob, loc, masks


def _batch(glob, loc, masks, rows):
    # crop-major stacking of the selected images
    g = torch.cat([glob[i, rows] for i in range(G)])
    lo = torch.cat([loc[i, rows] for i in range(L)])
    m = torch.cat([masks[i, rows] for i in range(G)])
    return Batch(g, lo, MaskBatch.from_masks(m, G), torch.zeros(len(rows)), G, L)


def _model(centering):
    torch.manual_seed(0)
    return tiny_ibot(drop_path_rate=0.0, centering=centering)


def _worker(rank, world, port, centering, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model(centering)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    glob, loc, masks = _inputs()
    rows = list(range(rank * B, (rank + 1) * B))
    out = ddp(batch=_batch(glob, loc, masks, rows), epoch=0)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    if rank == 0:
        grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
        torch.save(
            {
                "loss": loss / world,
                "grads": grads,
                "center": model.cls_center.center.clone(),
                "center2": model.patch_center_ema.center.clone(),
            },
            out_path,
        )
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("centering", ["center", "sinkhorn"])
def test_two_processes_equal_one_process_with_double_batch(tmp_path, centering):
    out_path = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), centering, str(out_path)), nprocs=2, join=True)
    ddp = torch.load(out_path)
    model = _model(centering)
    glob, loc, masks = _inputs()
    out = model(batch=_batch(glob, loc, masks, list(range(2 * B))), epoch=0)
    out.loss.backward()
    torch.testing.assert_close(ddp["loss"], out.loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ddp["center"], model.cls_center.center, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp["center2"], model.patch_center_ema.center, rtol=1e-5, atol=1e-6)
    for n, p in model.student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ddp["grads"][n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("fsdp", [False, True])
def test_torchrun_two_processes_then_resume_in_one(tmp_path, fsdp):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "ibot",
        "pretrain",
        "preset=smoke",
        f"run.output_dir={run}",
        "run.progress=false",
        "optim.batch_size=8",
        "run.max_steps=3",
        f"run.fsdp={str(fsdp).lower()}",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "k-NN" in res.stdout + res.stderr
    from ibot.io import load_safe

    ckpt = load_safe(run / "checkpoint.pth")
    assert ckpt["world_size"] == 2 and ckpt["global_step"] == 3
    res = subprocess.run(
        [sys.executable, "-m", "ibot", "pretrain", "--resume", str(run), "run.max_steps=5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = load_safe(run / "checkpoint.pth")
    assert ckpt["world_size"] == 1 and ckpt["global_step"] == 5


def _fsdp_worker(rank, world, port, out_path):
    from ibot.train.fsdp import full_model_state, full_optimizer_state, load_sharded_state, shard_model
    from ibot.train.step import TrainStep

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = shard_model(_model("center"))
    step = TrainStep(model, clip_grad=0.5)
    step.set_hyperparameters(lr=1e-3, weight_decay=0.04)
    glob, loc, masks = _inputs()
    rows = list(range(rank * B, (rank + 1) * B))
    out = step(_batch(glob, loc, masks, rows), step_values(model, 0, 0.9))
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    state, optim = full_model_state(model), full_optimizer_state(step.optimizer)
    # a round trip through the plain (world-size-free) checkpoint format gives the same shards back
    before = [p.to_local().clone() for p in model.student.parameters()]
    with torch.no_grad():
        for p in model.student.parameters():
            p.zero_()
    load_sharded_state(model, step.optimizer, state, optim)
    same = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.student.parameters(), strict=True))
    if rank == 0:
        torch.save({"loss": loss / world, "state": state, "optim": optim, "roundtrip": same}, out_path)
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_two_processes_equal_one_process_with_double_batch(tmp_path):
    """One full step (forward, backward, clipping, AdamW, EMA) sharded with FSDP2 over 2 gloo processes."""
    from ibot.train.step import TrainStep

    out_path = tmp_path / "fsdp.pt"
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(out_path)), nprocs=2, join=True)
    got = torch.load(out_path)
    model = _model("center")
    step = TrainStep(model, clip_grad=0.5)
    step.set_hyperparameters(lr=1e-3, weight_decay=0.04)
    glob, loc, masks = _inputs()
    out = step(_batch(glob, loc, masks, list(range(2 * B))), step_values(model, 0, 0.9))
    assert got["roundtrip"]
    torch.testing.assert_close(got["loss"], out.loss.detach(), rtol=1e-5, atol=1e-5)
    want = model.state_dict()
    assert set(got["state"]) == set(want)
    for k, v in want.items():  # updated student, EMA teacher, both centers
        torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    ref = step.optimizer.state_dict()
    assert got["optim"]["param_groups"] == ref["param_groups"]
    for i, s in ref["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["optim"]["state"][i][k], s[k], rtol=1e-4, atol=1e-6)


def _edp_model():
    torch.manual_seed(0)
    model = tiny_ibot(drop_path_rate=0.5)
    model.student["backbone"].efficient_drop_path = True
    return model


def _fsdp_edp_worker(rank, world, port, out_path):
    from ibot.train.fsdp import full_model_state, shard_model
    from ibot.train.step import TrainStep

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = shard_model(_edp_model())
    step = TrainStep(model, clip_grad=0.5)
    step.set_hyperparameters(lr=1e-3, weight_decay=0.04)
    glob, loc, masks = _inputs()
    torch.manual_seed(1)  # every rank: the same images and the same kept samples
    out = step(_batch(glob, loc, masks, list(range(B))), step_values(model, 0, 0.9))
    state = full_model_state(model)
    if rank == 0:
        torch.save({"loss": out.loss.detach(), "state": state}, out_path)
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_runs_the_efficient_drop_path_through_the_block_hooks(tmp_path):
    """``model.efficient_drop_path`` replaces each block's own ``forward``, so FSDP2's hooks (which gather
    the block's shards on the module call) still run: 2 sharded ranks fed the same images and the same
    seed end one step where one unsharded process does (the kept samples included)."""
    from ibot.train.step import TrainStep

    out_path = tmp_path / "fsdp_edp.pt"
    mp.spawn(_fsdp_edp_worker, args=(2, _free_port(), str(out_path)), nprocs=2, join=True)
    got = torch.load(out_path)
    model = _edp_model()
    step = TrainStep(model, clip_grad=0.5)
    step.set_hyperparameters(lr=1e-3, weight_decay=0.04)
    glob, loc, masks = _inputs()
    torch.manual_seed(1)
    out = step(_batch(glob, loc, masks, list(range(B))), step_values(model, 0, 0.9))
    torch.testing.assert_close(got["loss"], out.loss.detach(), rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    torch.manual_seed(1)  # the efficient path did run: the standard drop path draws other samples
    other = _edp_model()
    other.student["backbone"].efficient_drop_path = False
    again = TrainStep(other, clip_grad=0.5)
    again.set_hyperparameters(lr=1e-3, weight_decay=0.04)
    standard = again(_batch(glob, loc, masks, list(range(B))), step_values(other, 0, 0.9))
    assert not torch.allclose(standard.loss, out.loss)


def _ddp_flags_worker(rank, world, port, out_path):
    from ibot.distributed import wrap_ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ddp = wrap_ddp(_model("center"), torch.device("cpu"))
    if rank == 0:
        sync = getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", None))
        torch.save((sync, ddp.gradient_as_bucket_view), out_path)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_skips_the_per_forward_buffer_sync_and_uses_bucket_views(tmp_path):
    out_path = tmp_path / "flags.pt"
    mp.spawn(_ddp_flags_worker, args=(2, _free_port(), str(out_path)), nprocs=2, join=True)
    assert torch.load(out_path) == (False, True)


def _torchrun_pretrain(run, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmd += ["-m", "ibot", "pretrain", "preset=smoke", f"run.output_dir={run}", "run.progress=false"]
    cmd += ["optim.batch_size=8", "run.knn_at_end=false", *overrides]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def _shard_data(folder):
    """``data.*`` overrides for 64 RGB images in 4 WebDataset shards of 2 classes (4 steps per epoch on 2 ranks)."""
    import numpy as np
    from PIL import Image

    from ibot.data.shard_writer import write_shards

    rng = np.random.default_rng(0)
    for i in range(64):
        cls = folder / "imgs" / f"c{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(cls / f"{i}.png")
    write_shards(folder / "imgs", folder / "wds", shard_size=16, progress=False, log=str)
    return [f"data.path={folder / 'wds'}", "data.dataset=wds", "data.holdout=0", "data.num_workers=1"]


@pytest.mark.parametrize("data", ["synthetic", "wds"])
def test_two_process_resume_restores_each_ranks_rng(tmp_path, data):
    """Drop-path draws differ per rank: a resumed 2-process run must continue both ranks' streams, on the
    in-memory set and on WebDataset shards (stopped mid-epoch: step 2 of 4)."""
    import json

    from ibot.io import load_safe

    ov = _shard_data(tmp_path) if data == "wds" else []
    _torchrun_pretrain(tmp_path / "full", "run.max_steps=4", *ov)
    full_ckpt = load_safe(tmp_path / "full" / "checkpoint.pth")
    assert len(full_ckpt["rng_per_rank"]) == 2
    _torchrun_pretrain(tmp_path / "part", "run.max_steps=2", *ov)
    ckpt = load_safe(tmp_path / "part" / "checkpoint.pth")
    per_rank = ckpt["rng_per_rank"]
    assert len(per_rank) == 2 and not torch.equal(per_rank[0]["torch"], per_rank[1]["torch"])
    _torchrun_pretrain(tmp_path / "part", "run.max_steps=4", *ov)  # auto-resume in 2 processes

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    full, part = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert [s for s, _ in full] == [s for s, _ in part] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(full, part, strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6)


def _trainer_worker(rank, world, port, run, out_path):
    from ibot.config import build_config
    from ibot.train.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = build_config(
        "smoke",
        [
            f"run.output_dir={run}",
            "run.progress=false",
            "optim.batch_size=8",
            "run.knn_at_end=false",
            "run.max_steps=3",
        ],
    )
    tr = Trainer(cfg, log=lambda *a: None, resume="never")
    tr.fit()
    params = torch.cat([p.detach().reshape(-1) for p in tr.model.student.parameters()])
    torch.save(params, f"{out_path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_trainer_ranks_keep_identical_weights(tmp_path):
    """Every rank applies the same averaged update (DDP's settings must not break the gradient sync)."""
    out = tmp_path / "params"
    mp.spawn(_trainer_worker, args=(2, _free_port(), str(tmp_path / "run"), str(out)), nprocs=2, join=True)
    assert torch.equal(torch.load(f"{out}.0"), torch.load(f"{out}.1"))


def test_torchrun_dino_on_a_cnn_backbone(tmp_path):
    """DINO on a timm ResNet under DDP (BatchNorm in the backbone; per-process statistics on CPUs)."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmd += ["-m", "ibot", "pretrain", "preset=smoke", f"run.output_dir={run}", "run.progress=false"]
    cmd += ["method=dino", "model.arch=resnet18", "model.embed_dim=null", "model.depth=null", "model.num_heads=null"]
    cmd += ["optim.batch_size=8", "run.max_steps=2", "run.knn_at_end=false"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "statistics per process" in res.stdout + res.stderr
    from ibot.io import load_safe

    ckpt = load_safe(run / "checkpoint.pth")
    assert ckpt["world_size"] == 2 and ckpt["global_step"] == 2


def _empty_batch_worker(rank, world, port, run, out_path):
    """Rank 1 meets a batch of only unreadable images at step 1 (what the collate makes of it)."""
    import datetime

    from ibot.config import build_config
    from ibot.train.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    over = [f"run.output_dir={run}", "run.progress=false", "optim.batch_size=8", "run.knn_at_end=false"]
    tr = Trainer(build_config("smoke", [*over, "run.max_steps=3"]), log=lambda *a: None, resume="never")
    batches, train_step, stepped = tr.data.batches, tr.train_step, []

    def with_an_empty_batch(epoch, start):
        for i, b in enumerate(batches(epoch, start)):
            if rank == 1 and start + i == 1:
                b = Batch(torch.empty(0), None, None, torch.empty(0, dtype=torch.long), b.n_global, b.n_local, 8)
            yield b

    tr.data.batches = with_an_empty_batch
    tr.train_step = lambda batch, it, **kw: stepped.append(it) or train_step(batch, it, **kw)
    tr.fit()
    params = torch.cat([p.detach().reshape(-1) for p in tr.model.student.parameters()])
    torch.save({"params": params, "stepped": stepped, "global_step": tr.global_step}, f"{out_path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_a_rank_with_a_batch_of_only_unreadable_images_skips_the_step_with_every_rank(tmp_path):
    """Issue 25 item 4: a rank that skipped alone left the others in the step's collectives (a hang or
    mismatched collectives); every rank now skips that step together and stays in sync."""
    out = tmp_path / "res"
    mp.spawn(_empty_batch_worker, args=(2, _free_port(), str(tmp_path / "run"), str(out)), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert r0["stepped"] == r1["stepped"] == [0, 2] and r0["global_step"] == r1["global_step"] == 3
    assert torch.equal(r0["params"], r1["params"])

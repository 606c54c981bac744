#!/usr/bin/env python
"""One prepared check of ``ibot`` on a GPU: parity, bf16, throughput, loader, k-NN, NCCL + FSDP2.

Run it whenever a GPU is available (about 8 minutes on one GPU); it prints one table and writes
``benchmarks/results/gpu-<date>.json``::

    python benchmarks/gpu_check.py                          # on CUDA
    python benchmarks/gpu_check.py --device cpu --quick     # seconds-long smoke of every section (CI)

Sections:
  (a) parity of one fp32 step on the device (TF32 off, no drop-path) on fixed inputs with the same
      step in float64 on the CPU: loss and every student gradient, relative to their scale (target
      <= 1e-4; with --device cpu it compares CPU fp32 with CPU fp64, a real check too);
  (b) the bf16-autocast loss of the same step against fp32 (tolerance 2e-2 relative);
  (c) ViT-S/16, official recipe (2x224 + 10x96 crops, K=8192 shared head), B=64, bf16: images/s and
      peak memory of ibot eager, ibot compiled (per-block and whole-forward), and of the official
      code's step (own code following ``main_ibot.train_one_epoch``) when its source is given;
  (d) loader-only / step-only / end-to-end images/s (``loader_figures`` of
      ``benchmarks/loader_throughput.py``; skipped with a line when that file is absent);
  (e) ``ibot knn`` throughput: feature extraction (bf16) and the neighbour search on the device;
  (f) a 1-GPU ``torchrun`` smoke with NCCL and FSDP2 (gloo with ``--device cpu``);
  (g) no host sync in the training loop: 10 steps (loader, side-stream copy, device half, ``TrainStep``,
      the trainer's flag folding; no log step) under ``torch.cuda.set_sync_debug_mode("error")`` for
      ``data.pipeline`` tensor / pil / gpu x ``loss.centering`` center / sinkhorn (skipped without CUDA).

(d) also reports end-to-end over step-only images/s against its target (>= 0.9).

Offline GPU machines: only torch, timm, safetensors, tqdm, tensorboard and matplotlib may be
installed there. Bring the rest of ibot's dependencies as wheels, downloaded where pip works::

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 PyYAML
    # (antlr4-python3-runtime 4.9.3 is a source-only package: build its wheel with `pip wheel
    #  --no-deps antlr4-python3-runtime==4.9.3 -w .whl`)

then carry ``.whl/`` (and, for (c), a bytedance/ibot checkout in an ignored folder such as
``third_party/ibot``; it is imported, never committed) and run::

    pip install -q --no-index --no-deps --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD
    python benchmarks/gpu_check.py --official-src third_party/ibot

ibot itself needs no install: the script puts the repository root on ``sys.path``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import time
import traceback
import types
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

BF16_TOL = 2e-2
E2E_TARGET = 0.9  # (d): end-to-end images/s over step-only images/s
SYNC_STEPS = 10  # (g): steps run under torch.cuda.set_sync_debug_mode("error")
PARITY_TOL = 1e-4


# ------------------------------------------------------------------ shared helpers
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _no_tf32():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _sizes(quick: bool) -> dict:
    """ViT-S/16 official recipe, or a tiny model for the CPU smoke."""
    if quick:
        return dict(preset="smoke", img=32, local=16, n_local=2, batch=4, overrides=["model.drop_path=0.1"])
    return dict(preset="vit_small_in1k", img=224, local=96, n_local=10, batch=64, overrides=[])


def _build(sz: dict, extra=(), seed: int = 0):
    from ibot.builders.model import build_model
    from ibot.config import build_config

    cfg = build_config(sz["preset"], ["data.dataset=synthetic", *sz["overrides"], *extra])
    torch.manual_seed(seed)
    return cfg, build_model(cfg)


def _batch(cfg, model, sz: dict, batch: int, seed: int = 0):
    """Fixed inputs (made on the CPU from ``seed``) with the collate's masks."""
    import random

    from ibot.data.loader import Batch
    from ibot.data.masking import MaskBatch

    gen = torch.Generator().manual_seed(seed)
    c = cfg.model.in_chans
    g = torch.randn(2 * batch, c, sz["img"], sz["img"], generator=gen)
    loc = torch.randn(sz["n_local"] * batch, c, sz["local"], sz["local"], generator=gen) if sz["n_local"] else None
    grid = sz["img"] // cfg.model.patch_size
    masks = model.mask_generator(2 * batch, grid, grid, random.Random(seed))
    return Batch(g, loc, MaskBatch.from_masks(masks, 2), torch.zeros(batch, dtype=torch.long), 2, sz["n_local"])


def _step(model, cfg, device, precision="fp32"):
    from ibot.train.step import TrainStep

    o = cfg.optim
    step = TrainStep(
        model,
        precision=precision,
        device_type=device.type,
        clip_grad=o.clip_grad,
        clip_mode=o.clip_mode,
        betas=tuple(o.betas),
    )
    return step


def _values(cfg):
    """Step values of the checks: epoch 1's temperatures, a fixed lr / weight decay / momentum, prototypes free."""
    from ibot.train.schedules import Schedules

    o = cfg.optim
    v = Schedules.from_config(cfg, 1)[1]
    return replace(v, lr=o.lr * 64 / 256, weight_decay=o.weight_decay, momentum=0.996, freeze_last_layer=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# ------------------------------------------------------------------ (a) parity, (b) bf16
def _fp_step(sz: dict, batch: int, device, dtype) -> tuple[torch.Tensor, dict, dict]:
    """Loss, student gradients and updated student parameters of one no-drop-path step in ``dtype``
    on ``device``."""
    cfg, model = _build(sz, ["model.drop_path=0.0"])  # the same init on every side
    model = model.to(device, dtype).train()
    b = _batch(cfg, model, sz, batch)
    loc = None if b.local_crops is None else b.local_crops.to(dtype)
    b = replace(b, global_crops=b.global_crops.to(dtype), local_crops=loc)
    out = _step(model, cfg, device)(b.to(device), _values(cfg))
    named = list(model.student.named_parameters())
    grads = {n: p.grad.detach().cpu() for n, p in named if p.grad is not None}
    return out.loss.detach().cpu(), grads, {n: p.detach().cpu() for n, p in named}


def check_parity(device, quick: bool) -> dict:
    """One fp32 step on ``device`` against the same step in float64 on the CPU (the reference): the
    loss and every student gradient, each relative to its tensor's scale.

    With ``--device cpu`` the two sides are still two computations (fp32 vs fp64), so the check can
    fail there too: a difference of 0 means both sides ran the same code in the same precision.
    The updated parameters are reported, not checked: AdamW's first step divides each gradient by
    its own magnitude, so rounding noise on a gradient that is exactly 0 in exact arithmetic (the
    attention key bias) moves that parameter by up to the lr on either side.
    """
    sz = _sizes(quick)
    batch = 4 if quick else 8
    with _no_tf32():
        loss_ref, g_ref, p_ref = _fp_step(sz, batch, torch.device("cpu"), torch.float64)
        loss_dev, g_dev, p_dev = _fp_step(sz, batch, device, torch.float32)
    rel_loss = _rel(loss_dev, loss_ref)
    rel_grads = max(_rel(g_dev[n], g_ref[n]) for n in g_ref) if g_dev.keys() == g_ref.keys() else math.inf
    rel_params = max(_rel(p_dev[n], p_ref[n]) for n in p_ref)
    return {
        "loss_reference_fp64": float(loss_ref),
        "loss_device": float(loss_dev),
        "rel_loss": rel_loss,
        "rel_grads_max": rel_grads,
        "rel_params_max": rel_params,
        "tolerance": PARITY_TOL,
        "ok": 0 < rel_loss <= PARITY_TOL and rel_grads <= PARITY_TOL,
    }


def check_bf16(device, quick: bool) -> dict:
    sz = _sizes(quick)
    batch = 4 if quick else 16
    losses = {}
    for prec in ("fp32", "bf16"):
        cfg, model = _build(sz, ["model.drop_path=0.0"])
        model = model.to(device).train()
        b = _batch(cfg, model, sz, batch).to(device)
        with _no_tf32():
            out = _step(model, cfg, device, prec)(b, _values(cfg))
        losses[prec] = float(out.loss.detach().float())
    rel = abs(losses["bf16"] - losses["fp32"]) / abs(losses["fp32"])
    return {**{f"loss_{k}": v for k, v in losses.items()}, "rel": rel, "tolerance": BF16_TOL, "ok": rel <= BF16_TOL}


# ------------------------------------------------------------------ (c) throughput
def _time(fn, device, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds per step, peak GiB) of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return dt, peak


def _ibot_runner(device, quick: bool, compile_mode: str | None):
    sz = _sizes(quick)
    cfg, model = _build(sz)
    model = model.to(device).train()
    precision = "bf16" if device.type == "cuda" else "fp32"
    if compile_mode == "blocks":
        for bb in (model.student["backbone"], model.teacher["backbone"]):
            for blk in bb.blocks:
                blk.compile()
    step = _step(model, cfg, device, precision)
    if compile_mode == "full":
        from ibot.train.compiled import compile_forward

        step.module = compile_forward(model)
    b = _batch(cfg, model, sz, sz["batch"]).to(device)
    if compile_mode == "full":
        from ibot.train.compiled import pad_mask_batch

        b.masks = pad_mask_batch(b.masks, model.mask_generator.max_ratio)
    return lambda: step(b, _values(cfg)), sz["batch"]


def _official_runner(device, quick: bool, src: str):
    """The official step (models, head, loss, clipping, EMA imported from ``src``) under bf16 autocast."""
    src = str(Path(src).resolve())
    if src not in sys.path:
        sys.path.insert(0, src)
    for name in ("tensorboardX", "evaluation", "evaluation.unsupervised", "evaluation.unsupervised.unsup_cls"):
        sys.modules.setdefault(name, types.ModuleType(name))  # imported by main_ibot, unused by a step
    sys.modules["tensorboardX"].SummaryWriter = None
    sys.modules["evaluation.unsupervised.unsup_cls"].eval_pred = None
    import main_ibot
    import models
    import torch.distributed as dist
    import utils
    from models.head import iBOTHead

    if not dist.is_initialized():  # iBOTLoss all-reduces its centers
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    sz = _sizes(quick)
    cfg, ours = _build(sz)
    m = cfg.model
    k = m.out_dim
    vit = ours.student["backbone"].timm_model  # the same sizes as ibot's model (ViT-S/16 on a GPU)
    dims = dict(embed_dim=vit.embed_dim, depth=len(vit.blocks), num_heads=vit.blocks[0].attn.num_heads)

    def net(**kw):
        return models.VisionTransformer(
            img_size=[sz["img"]],
            patch_size=m.patch_size,
            in_chans=m.in_chans,
            mlp_ratio=4,
            qkv_bias=True,
            return_all_tokens=True,
            **dims,
            **kw,
        )

    def head(**kw):
        return iBOTHead(ours.embed_dim, k, patch_out_dim=k, act="gelu", shared_head=True, **kw)

    student = utils.MultiCropWrapper(
        net(drop_path_rate=m.drop_path, masked_im_modeling=True), head(norm_last_layer=False)
    )
    teacher = utils.MultiCropWrapper(net(), head())
    teacher.load_state_dict(student.state_dict(), strict=False)
    student, teacher = student.to(device).train(), teacher.to(device).train()
    for p in teacher.parameters():
        p.requires_grad = False
    loss_fn = main_ibot.iBOTLoss(k, k, 2, sz["n_local"], 0.04, 0.07, 0.04, 0.07, 30, 800).to(device)
    opt = torch.optim.AdamW(utils.get_params_groups(student))
    t_params = dict(teacher.named_parameters())
    pairs = [(q, t_params[n]) for n, q in student.named_parameters() if n in t_params]
    b = _batch(cfg, ours, sz, sz["batch"])
    bs = sz["batch"]
    images = [x.to(device) for x in b.global_crops.split(bs)]
    if b.local_crops is not None:
        images += [x.to(device) for x in b.local_crops.split(bs)]
    grid = sz["img"] // m.patch_size
    masks = [x.reshape(bs, grid, grid).to(device) for x in b.masks.masks.split(bs)]
    # bf16 on CUDA as ibot's run; fp32 on the CPU smoke (as ibot's there)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step():
        with autocast:
            t_out = teacher(images[:2])
            s_out = student(images[:2], mask=masks)
            student.backbone.masked_im_modeling = False
            s_local = student(images[2:])[0] if len(images) > 2 else None
            student.backbone.masked_im_modeling = True
            loss = loss_fn(s_out, t_out, s_local, masks, 1)["loss"]
        if not math.isfinite(loss.item()):
            raise FloatingPointError("official loss is not finite")
        opt.zero_grad()
        loss.backward()
        utils.clip_gradients(student, 3.0)
        utils.cancel_gradients_last_layer(1, student, 1)
        opt.step()
        with torch.no_grad():
            for q, t in pairs:
                t.data.mul_(0.996).add_((1 - 0.996) * q.detach().data)

    return step, bs


def check_throughput(device, quick: bool, official_src: str | None, steps: int) -> dict:
    warmup = 1 if quick else 5
    rows = {}
    runners = [("ibot eager", None), ("ibot compiled (blocks)", "blocks"), ("ibot compiled (full)", "full")]
    if quick and device.type == "cpu":  # the smoke traces the whole-forward graph without C++ compilation
        from ibot.train import compiled

        compiled.BACKEND = "eager"
        runners = runners[:1] + runners[2:]
    for name, mode in runners:
        try:
            fn, bs = _ibot_runner(device, quick, mode)
            dt, peak = _time(fn, device, warmup + (2 if mode else 0), steps)
            rows[name] = {"images_per_s": bs / dt, "peak_gib": peak, "s_per_step": dt}
        except Exception as err:  # a failure is a result of the check, not the end of the script
            rows[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if official_src:
        try:
            fn, bs = _official_runner(device, quick, official_src)
            dt, peak = _time(fn, device, warmup, steps)
            rows["official"] = {"images_per_s": bs / dt, "peak_gib": peak, "s_per_step": dt}
        except Exception as err:
            rows["official"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    else:
        rows["official"] = {"skipped": "no --official-src (a bytedance/ibot checkout carried in an ignored folder)"}
    eager = rows["ibot eager"].get("images_per_s")
    ratios = {}
    for name in ("ibot compiled (blocks)", "ibot compiled (full)"):
        if eager and rows.get(name, {}).get("images_per_s"):
            ratios[f"{name} / eager"] = rows[name]["images_per_s"] / eager
    if eager and rows["official"].get("images_per_s"):
        ratios["eager / official"] = eager / rows["official"]["images_per_s"]
    return {"runs": rows, "ratios": ratios, "batch": _sizes(quick)["batch"], "steps": steps}


# ------------------------------------------------------------------ (d) loader
def check_loader(device, quick: bool) -> dict:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    try:
        from loader_throughput import loader_figures
    except ImportError as err:
        return {"skipped": f"benchmarks/loader_throughput.py is not here ({err}); (d) needs the data-path issue"}
    kw = dict(batch_size=8, step_repeats=2, preset="smoke") if quick else dict(batch_size=64, step_repeats=10)
    n_images = 32 if quick else 2048
    workers = 0 if quick else min(8, os.cpu_count() or 1)
    try:
        res = loader_figures(device, workers, n_images, **kw)
    except TypeError as err:
        return {"skipped": f"loader_figures has another signature ({err})"}
    ratio = res.get("end_to_end_after_fill_over_step", res.get("end_to_end_over_step"))
    if ratio is not None:  # the data path keeps the step fed: end-to-end >= 0.9 x step-only images/s
        res.update(end_to_end_target=E2E_TARGET, end_to_end_ok=bool(ratio >= E2E_TARGET))
    return res


# ------------------------------------------------------------------ (e) k-NN
def check_knn(device, quick: bool) -> dict:
    from ibot.data.datasets import build_dataset
    from ibot.eval.knn import extract_features, knn_classify

    sz = _sizes(quick)
    cfg, model = _build(sz)
    backbone = model.teacher["backbone"].to(device).eval()
    n_train, n_test = (64, 16) if quick else (20000, 5000)
    kw = dict(image_size=sz["img"], in_chans=cfg.model.in_chans, synthetic_size=n_train)
    train = build_dataset("synthetic", None, train=True, **kw)
    test = build_dataset("synthetic", None, train=False, **{**kw, "synthetic_size": 4 * n_test})
    ekw = dict(image_size=sz["img"], in_chans=cfg.model.in_chans, device=device, batch_size=256)
    extract_features(backbone.forward_cls, test, **ekw, limit=min(256, len(test)))  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    tr_f, tr_y = extract_features(backbone.forward_cls, train, **ekw)
    te_f, te_y = extract_features(backbone.forward_cls, test, **ekw)
    _sync(device)
    t1 = time.perf_counter()
    knn_classify(tr_f, tr_y, te_f, te_y, ks=(10, 20, 100, 200), device=device)
    _sync(device)
    t2 = time.perf_counter()
    n = len(tr_y) + len(te_y)
    return {"images": n, "extract_images_per_s": n / (t1 - t0), "search_s": t2 - t1, "image_size": sz["img"]}


# ------------------------------------------------------------------ (f) torchrun NCCL + FSDP2
def fsdp_worker(device_name: str) -> None:
    """Run under torchrun: NCCL (gloo on CPU) bound to the device, FSDP2 shards, two steps."""
    import torch.distributed as dist

    from ibot.train.fsdp import full_model_state, shard_model

    local = int(os.environ.get("LOCAL_RANK", 0))
    if device_name.startswith("cuda"):
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    sz = _sizes(True)
    cfg, model = _build(sz, ["model.drop_path=0.0"])
    b = _batch(cfg, model, sz, 4).to(device)
    model = shard_model(model.to(device).train())
    step = _step(model, cfg, device, "bf16" if device.type == "cuda" else "fp32")
    losses = [float(step(b, _values(cfg)).loss.detach().float()) for _ in range(2)]
    state = full_model_state(model)
    out = {
        "backend": dist.get_backend(),
        "world_size": dist.get_world_size(),
        "losses": losses,
        "finite": all(math.isfinite(x) for x in losses),
        "gathered_tensors": len(state),
    }
    dist.barrier()
    dist.destroy_process_group()
    print("@@FSDP@@" + json.dumps(out))


def check_torchrun(device) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(port)]
    cmd += [str(Path(__file__).resolve()), "--fsdp-worker", "--device", str(device)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    for line in res.stdout.splitlines():
        if line.startswith("@@FSDP@@"):
            out = json.loads(line[len("@@FSDP@@") :])
            return {**out, "ok": out["finite"] and out["gathered_tensors"] > 0}
    return {"error": (res.stderr or res.stdout)[-800:], "ok": False}


# ------------------------------------------------------------------ (g) no host sync in the loop
def _image_folder(root: Path, n: int, size: int = 48) -> Path:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        px = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=gen).numpy()
        Image.fromarray(px).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def _steps_under_sync_error(tr, steps: int) -> dict:
    """One warm-up step, then ``steps`` steps as ``Trainer.fit`` queues them between log steps
    (next batch, ``train_step``), with any host synchronisation an error."""
    tr.model.train()
    batches = iter(tr.data.batches(0))
    tr.train_step(next(batches), 0)  # optimizer state, cached constants, kernel selection
    torch.cuda.synchronize(tr.device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(1, steps + 1):
            tr.train_step(next(batches), k)
    except RuntimeError as err:
        return {"ok": False, "error": str(err).splitlines()[0][:300], "trace": traceback.format_exc()[-1500:]}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(tr.device)
    return {"ok": True, "steps": steps, "bad": tr.flags.read().bad}


def check_no_sync(device, quick: bool, steps: int = SYNC_STEPS) -> dict:
    if device.type != "cuda":
        return {"skipped": "needs CUDA (torch.cuda.set_sync_debug_mode)"}
    import tempfile

    from ibot.config import build_config
    from ibot.train.trainer import Trainer

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = _image_folder(Path(tmp) / "imgs", 4 * (steps + 2))
        for pipeline in ("tensor", "pil", "gpu"):
            data = ["data.dataset=synthetic", f"data.synthetic_size={4 * (steps + 2)}"]
            if pipeline != "tensor":
                data = ["data.dataset=imagefolder", f"data.path={folder}", "data.holdout=0"]
            for centering in ("center", "sinkhorn"):
                over = [*data, f"data.pipeline={pipeline}", f"loss.centering={centering}", "optim.batch_size=4"]
                over += [f"run.output_dir={tmp}/{pipeline}-{centering}", "run.device=cuda", "run.progress=false"]
                name = f"{pipeline} / {centering}"
                try:
                    tr = Trainer(build_config("smoke", over), log=lambda *a: None, resume="never")
                    rows[name] = _steps_under_sync_error(tr, steps)
                except Exception as err:
                    rows[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
                finally:
                    torch.cuda.set_sync_debug_mode(0)
    return {"ok": all(r["ok"] for r in rows.values()), "runs": rows, "steps": steps}


# ------------------------------------------------------------------ table
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def table(results: dict) -> str:
    lines = [f"ibot gpu_check on {results['device_name']} (torch {results['torch']})", ""]
    for key, title in [
        ("a_parity", "(a) device fp32 vs CPU fp64 step"),
        ("b_bf16", "(b) bf16 vs fp32 loss"),
        ("c_throughput", "(c) ViT-S/16 step throughput"),
        ("d_loader", "(d) loader / step / end-to-end"),
        ("e_knn", "(e) k-NN throughput"),
        ("f_torchrun", "(f) torchrun NCCL + FSDP2"),
        ("g_no_sync", "(g) steps under set_sync_debug_mode('error')"),
    ]:
        sec = results.get(key, {})
        lines.append(title)
        if key in ("c_throughput", "g_no_sync") and "runs" in sec:
            for name, row in sec["runs"].items():
                lines.append(f"  {name:<24} " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "trace"))
            for name, r in sec.get("ratios", {}).items():
                lines.append(f"  {name:<24} {r:.2f}x")
        else:
            items = sec.items() if isinstance(sec, dict) else [("value", sec)]
            lines.append("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in items if not isinstance(v, (dict, list))))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes (the CPU smoke); default with cpu")
    p.add_argument("--official-src", default=os.environ.get("IBOT_OFFICIAL_SRC"), help="bytedance/ibot checkout")
    p.add_argument("--steps", type=int, help="timed steps per (c) runner (default 20; 2 with --quick)")
    p.add_argument("--only", nargs="+", choices=list("abcdefg"), help="run only these sections")
    p.add_argument("--out", help="JSON path (default benchmarks/results/gpu-<date>.json; -quick on the CPU smoke)")
    p.add_argument("--fsdp-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.fsdp_worker:
        fsdp_worker(a.device)
        return 0
    from ibot.device import resolve_device

    device = resolve_device(a.device)
    quick = a.quick or device.type == "cpu"
    steps = a.steps or (2 if quick else 20)
    sections = {
        "a": ("a_parity", lambda: check_parity(device, quick)),
        "b": ("b_bf16", lambda: check_bf16(device, quick)),
        "c": ("c_throughput", lambda: check_throughput(device, quick, a.official_src, steps)),
        "d": ("d_loader", lambda: check_loader(device, quick)),
        "e": ("e_knn", lambda: check_knn(device, quick)),
        "f": ("f_torchrun", lambda: check_torchrun(device)),
        "g": ("g_no_sync", lambda: check_no_sync(device, quick)),
    }
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {"device_name": name, "torch": torch.__version__, "quick": quick, "date": _dt.date.today().isoformat()}
    t_all = time.perf_counter()
    for letter, (key, fn) in sections.items():
        if a.only and letter not in a.only:
            continue
        t0 = time.perf_counter()
        try:
            results[key] = fn()
        except Exception as err:
            results[key] = {"error": f"{type(err).__name__}: {err}"[:500], "trace": traceback.format_exc()[-2000:]}
        results[key]["seconds"] = time.perf_counter() - t0
        print(f"[{letter}] {key} done in {results[key]['seconds']:.1f}s", file=sys.stderr, flush=True)
    results["seconds"] = time.perf_counter() - t_all
    print(table(results))
    date = _dt.datetime.now().strftime("%Y-%m-%d")
    out = Path(a.out) if a.out else HERE / "results" / f"gpu-{date}{'-quick' if quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Typed configuration (dataclasses + OmegaConf), presets and ``key=value`` overrides.

A run is ``preset + overrides``: ``ibot pretrain preset=fmnist_tiny optim.epochs=5 run.output_dir=runs/x``.
An unknown key is an error listing the closest known keys; a value of the wrong type is an error
naming the key and the expected type. The resolved config is saved in the run folder and in every
checkpoint.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

# data.dataset's allowed values; tests/test_config.py checks they are the names ibot.data.datasets builds
DATASET_NAMES = ("imagefolder", "folder", "fashion_mnist", "mnist", "cifar10", "cifar100", "synthetic", "wds", "hf")


@dataclass
class ModelConfig:
    arch: str = "vit_small_patch16_224"  # any timm ViT or Swin (swin_*) name
    patch_size: int = 16  # ViT patch; Swin: patch-embedding size (masks use cells of patch_size * 8)
    img_size: int = 224  # global crop size; position embeddings are made for it
    in_chans: int = 3  # image channels: 3 (RGB) or 1 (grayscale)
    embed_dim: int | None = None  # override the timm width (custom small ViTs)
    depth: int | None = None  # override the timm number of blocks
    num_heads: int | None = None  # override the timm attention heads
    window_size: int | None = None  # Swin attention window (official: 7 or 14)
    depths: list[int] | None = None  # Swin blocks per stage (timm default for the arch when None)
    stage_heads: list[int] | None = None  # Swin attention heads per stage
    drop_path: float = 0.1  # student only
    efficient_drop_path: bool = False  # run residual branches on kept samples only (DINOv2)
    out_dim: int = 8192  # CLS prototypes
    patch_out_dim: int = 8192  # patch prototypes (ignored when shared_head)
    shared_head: bool = True  # CLS and patch tokens share one head and its prototypes (official --shared_head)
    hidden_dim: int = 2048  # head MLP hidden width
    bottleneck_dim: int = 256  # head MLP output width, before the L2-normalised prototypes
    head_layers: int = 3  # head MLP layers
    head_norm: str = "none"  # none | bn | ln
    head_act: str = "gelu"  # head activation (official gelu)
    norm_last_layer: bool = True  # freeze the prototype weight-norm gain (official --norm_last_layer)


@dataclass
class MaskConfig:
    shape: str = "block"  # block | rand
    ratio: list[float] = field(default_factory=lambda: [0.3])  # official pred_ratio (pairs with ratio_var)
    ratio_var: list[float] = field(default_factory=lambda: [0.0])  # official pred_ratio_var (ratio +- var)
    start_epoch: int = 0  # official pred_start_epoch
    probability: float = 1.0  # fraction of images masked at all (DINOv2); 1.0 = official
    min_patches: int | None = None  # minimum block area; None = (min(h, w) // 3) ** 2
    # mask the student's global crops (official --use_masked_im_modeling, on by default); null = the
    # method's default: method=ibot masks, also with loss.lambda2=0 (the official --lambda2 0), method=dino
    # never masks. false needs loss.lambda2=0 (DINO's inputs on iBOT's heads)
    enabled: bool | None = None


@dataclass
class LossConfig:
    lambda1: float = 1.0  # CLS loss weight
    lambda2: float = 1.0  # patch loss weight (0: no patch loss; the student stays masked unless mask.enabled=false)
    student_temp: float = 0.1  # student softmax temperature
    warmup_teacher_temp: float = 0.04  # CLS teacher temperature at epoch 0 (linear warm-up to teacher_temp)
    teacher_temp: float = 0.04  # CLS teacher temperature after the warm-up
    warmup_teacher_patch_temp: float = 0.04  # patch teacher temperature at the warm-up start
    teacher_patch_temp: float = 0.07  # patch teacher temperature after the warm-up
    warmup_teacher_temp_epochs: int = 30  # epochs of both teacher-temperature warm-ups
    centering: str = "center"  # center | sinkhorn
    patch_center: str = "all"  # all (official) | masked (DINOv2)
    center_momentum: float = 0.9  # EMA momentum of the CLS and patch centers
    sinkhorn_iterations: int = 3  # Sinkhorn-Knopp iterations (loss.centering=sinkhorn)
    koleo_weight: float = 0.0  # KoLeo regulariser on the student CLS features (DINOv2); 0 = off


@dataclass
class DataConfig:
    dataset: str = "imagefolder"  # imagefolder | folder | fashion_mnist | mnist | cifar10/100 | synthetic | wds | hf
    path: str | None = None  # image folder, .tar shards (wds: DIR or DIR/x-{000..127}.tar), or where downloads live
    val_path: str | None = None  # wds/hf: the evaluation data (default: data.holdout of the keys, hashed, held out)
    image_key: str | None = None  # hf: the image column (default: the first Image column)
    label_key: str | None = None  # hf: the label column (default: the first ClassLabel column)
    streaming: bool = False  # hf: stream the rows (an IterableDataset: a set too big to map, or a hub name)
    steps_per_epoch: int = 0  # streaming: steps of an epoch (0 = the rows the dataset declares / total batch)
    shuffle_buffer: int = 1000  # streaming: rows in each worker's shuffle buffer
    # auto | pil | tensor (vectorised augmentation of in-memory datasets) | gpu (workers crop and flip,
    # the device jitters, blurs, solarizes, normalises); auto: tensor in memory, else gpu on CUDA, else pil
    pipeline: str = "auto"
    global_crops_number: int = 2  # global crops per image (official 2)
    global_crops_scale: list[float] = field(default_factory=lambda: [0.14, 1.0])  # global crop area range
    local_crops_number: int = 0  # local crops per image (official recipe: 10)
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])  # local crop area range
    local_crop_size: int = 96  # local crop size in pixels (a multiple of model.patch_size)
    blur_scale: float = 1.0  # multiplies the blur radius range (0.1, 2.0)
    color_jitter_p: float = 0.8  # probability of brightness/contrast(/saturation/hue) jitter per crop
    solarization_p: float = 0.2  # probability of solarizing the second global crop
    num_workers: int = 4  # DataLoader worker processes per training process
    synthetic_size: int = 256  # images of data.dataset=synthetic
    limit: int = 0  # use only the first N training images (0 = all)
    holdout: float = 0.1  # share held out to evaluate on (0 = none): imagefolder w/o val/ per class, wds/hf by key hash
    max_skip_fraction: float = 0.05  # stop when more unreadable images than this were skipped


@dataclass
class OptimConfig:
    epochs: int = 100  # length of the lr / weight-decay / momentum / temperature schedules
    batch_size: int = 128  # per process
    lr: float = 5e-4  # for a total batch of 256 (scaled linearly)
    min_lr: float = 1e-6  # lr at the end of the cosine
    warmup_epochs: float = 10  # linear lr warm-up (fractions of an epoch allowed)
    weight_decay: float = 0.04  # weight decay at step 0 (cosine to weight_decay_end)
    weight_decay_end: float = 0.4  # weight decay at the last step
    clip_grad: float = 3.0  # 0 disables
    clip_mode: str = "param"  # param (official) | global
    freeze_last_layer: int = 1  # epochs during which the prototypes get no gradient
    momentum_teacher: float = 0.996  # teacher EMA momentum at step 0 (cosine to 1)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas


@dataclass
class RunConfig:
    output_dir: str = "runs/ibot"  # run folder: config, metrics, curves, checkpoints (resumed when it has one)
    init_from: str | None = None  # start from weights: ibot or official iBOT checkpoint, timm .safetensors/.pth
    seed: int = 0  # seed of the weights, crops, masks and data order
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (fp32 on CPU, bf16 on CUDA) | fp32 | bf16 | fp16
    threads: int = 0  # torch CPU threads (0 = torch default)
    grad_checkpointing: bool = False  # activation checkpointing of the student blocks (memory for compute)
    compile: bool = False  # torch.compile (how: run.compile_mode)
    compile_mode: str = "blocks"  # blocks: each transformer block | full: the whole forward, fullgraph, padded masks
    fsdp: bool = False  # shard student and teacher with FSDP2 (torchrun; large backbones, see docs/distributed.md)
    log_every: int = 10  # steps between metric lines
    save_every_steps: int = 0  # also checkpoint every N steps (crash safety inside long epochs)
    save_every_minutes: float = 30  # also checkpoint after this much time since the last save (0 = off)
    saveckp_freq: int = 0  # keep checkpoint{epoch:04}.pth every N epochs (0 = only the last)
    knn_every: int = 0  # epochs between k-NN evaluations (0 = only at the end)
    knn_at_end: bool = True  # k-NN evaluation after training
    knn_k: int = 20  # neighbours of the reported k-NN top-1
    knn_temperature: float = 0.07  # k-NN vote temperature (votes weighted by exp(sim / T))
    knn_train_limit: int = 0  # use at most N memory-bank images (0 = all)
    knn_split: str = "test"  # test | val (val: the last 10k training images are the queries, for tuning)
    baselines: bool = True  # score raw pixels and the untrained model beside the final k-NN (RUN/baselines.json)
    max_steps: int = 0  # stop after N steps (0 = the whole schedule); schedules keep their length
    time_limit_min: float = 0  # stop training after this many minutes of training time (0 = none)
    max_bad_steps: int = 5  # consecutive non-finite losses before stopping
    progress: bool = True  # a progress bar per epoch (rank 0); false: a text line every run.print_every_s
    print_every_s: float = 30.0  # seconds between text progress lines when run.progress=false
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])  # any of tensorboard, csv, wandb
    wandb_project: str = "ibot"  # W&B project (run.loggers has wandb)
    wandb_mode: str = "offline"  # offline (sync later: wandb sync RUN/wandb) | online | disabled
    allow_schedule_change: bool = False  # resume with changed optim schedule keys (e.g. more optim.epochs)


@dataclass
class Config:
    method: str = "ibot"  # ibot | dino
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


PRESETS: dict[str, dict[str, Any]] = {
    # The official ViT-S/16 800-epoch README recipe (16 GPUs x 64). Needs data.path=IMAGENET.
    "vit_small_in1k": {
        "model": {
            "arch": "vit_small_patch16_224",
            "patch_size": 16,
            "img_size": 224,
            "out_dim": 8192,
            "patch_out_dim": 8192,
            "shared_head": True,
            "norm_last_layer": False,
            "drop_path": 0.1,
            # residual branches on the kept samples only: the official drop path in expectation, with
            # fewer student FLOPs (benchmarks/README.md); model.efficient_drop_path=false is the official stream
            "efficient_drop_path": True,
        },
        "mask": {"shape": "block", "ratio": [0.0, 0.3], "ratio_var": [0.0, 0.2]},
        "loss": {"teacher_temp": 0.07, "warmup_teacher_temp_epochs": 30},
        "data": {
            "dataset": "imagefolder",
            "global_crops_scale": [0.25, 1.0],
            "local_crops_number": 10,
            "local_crops_scale": [0.05, 0.25],
            "local_crop_size": 96,
            "num_workers": 10,
        },
        "optim": {"epochs": 800, "batch_size": 64, "lr": 5e-4, "warmup_epochs": 10},
    },
    # CPU default for 28x28 grayscale images (Fashion-MNIST); see benchmarks/README.md.
    "fmnist_tiny": {
        "model": {
            "arch": "vit_tiny_patch16_224",
            "patch_size": 7,
            "img_size": 28,
            "in_chans": 1,
            "embed_dim": 128,
            "depth": 4,
            "num_heads": 4,
            "drop_path": 0.0,
            "out_dim": 512,
            "patch_out_dim": 512,
            "shared_head": True,
            "hidden_dim": 512,
            "bottleneck_dim": 128,
            "norm_last_layer": True,
        },
        "mask": {"shape": "block", "ratio": [0.0, 0.3], "ratio_var": [0.0, 0.2]},
        # KoLeo spreads the CLS features (without it they collapse onto ~3 directions, RankMe 12 of 128,
        # and k-NN stalls near 70%); a constant 0.04 teacher keeps the targets sharp after epoch 1.
        # At this scale the masked-patch loss carries most of the signal (the CLS targets stay near
        # uniform for the whole budget), hence lambda2 = 2; local crops cost a third of the step and
        # did not pay for it (benchmarks/README.md).
        "loss": {
            "teacher_temp": 0.04,
            "teacher_patch_temp": 0.04,
            "warmup_teacher_temp_epochs": 1,
            "koleo_weight": 2.0,
            "lambda2": 2.0,
        },
        "data": {
            "dataset": "fashion_mnist",
            "pipeline": "tensor",
            "global_crops_scale": [0.35, 1.0],
            "local_crops_number": 0,  # data.local_crops_number=4 gives the 14-px local crops below
            "local_crops_scale": [0.1, 0.35],
            "local_crop_size": 14,
            "blur_scale": 0.25,
        },
        "optim": {
            "epochs": 1,
            "batch_size": 256,
            "lr": 1e-3,
            "warmup_epochs": 0.2,
            "min_lr": 1e-5,
            "momentum_teacher": 0.99,
            "freeze_last_layer": 0,
            "weight_decay": 0.04,
            "weight_decay_end": 0.1,
        },
        "run": {"output_dir": "runs/fmnist_tiny", "log_every": 20},
    },
    # Seconds on a CPU: synthetic images, a 2-block ViT. For tests and trying the CLI.
    "smoke": {
        "model": {
            "arch": "vit_tiny_patch16_224",
            "patch_size": 8,
            "img_size": 32,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
            "drop_path": 0.1,
            "out_dim": 64,
            "patch_out_dim": 64,
            "hidden_dim": 64,
            "bottleneck_dim": 32,
        },
        "mask": {"ratio": [0.0, 0.3], "ratio_var": [0.0, 0.2]},
        "loss": {"warmup_teacher_temp_epochs": 1, "teacher_temp": 0.07},
        "data": {
            "dataset": "synthetic",
            "synthetic_size": 64,
            "local_crops_number": 2,
            "local_crop_size": 16,
            "num_workers": 0,
            "global_crops_scale": [0.4, 1.0],
        },
        "optim": {"epochs": 2, "batch_size": 16, "warmup_epochs": 1, "lr": 1e-3},
        "run": {"output_dir": "runs/smoke", "log_every": 1, "knn_k": 5},
    },
}

# The smoke run with a 3-stage Swin (patch 2, window 4): mask cells of 8 px, a 4 x 4 prediction grid.
_smoke = PRESETS["smoke"]
PRESETS["swin_smoke"] = {
    **_smoke,
    "model": {
        **{k: v for k, v in _smoke["model"].items() if k not in ("depth", "num_heads")},
        "arch": "swin_tiny_patch4_window7_224",
        "patch_size": 2,
        "embed_dim": 16,
        "depths": [2, 2, 2],
        "stage_heads": [1, 2, 4],
        "window_size": 4,
    },
    "run": {**_smoke["run"], "output_dir": "runs/swin_smoke"},
}

# The official Swin-T recipes: the ViT-S flags with ``--patch_size 4 --window_size {7,14}
# --pred_start_epoch 50`` and 300 epochs (README). Swin-T/14 ran on 40 GPUs x 26; the README gives
# 16 GPUs for Swin-T/7 but not its batch, so 16 x 64 (the ViT-S total of 1024) is used here.
_vit_small = PRESETS["vit_small_in1k"]
for _window, _batch in ((7, 64), (14, 26)):
    PRESETS[f"swin_tiny_w{_window}_in1k"] = {
        **_vit_small,
        "model": {
            **{k: v for k, v in _vit_small["model"].items() if k != "efficient_drop_path"},  # ViT only
            "arch": "swin_tiny_patch4_window7_224",
            "patch_size": 4,
            "window_size": _window,
        },
        "mask": {**_vit_small["mask"], "start_epoch": 50},
        "optim": {**_vit_small["optim"], "epochs": 300, "batch_size": _batch},
    }


class ConfigError(ValueError):
    """A config key or value is wrong; the message says which and what is allowed."""


def _all_keys(cfg) -> list[str]:
    keys = []
    for section, value in OmegaConf.to_container(cfg).items():
        if isinstance(value, dict):
            keys += [f"{section}.{k}" for k in value]
        else:
            keys.append(section)
    return keys


def parse_value(text: str) -> Any:
    """Command-line value -> Python: ``[0,0.3]`` lists, ``true``, ``null``, ``1e-3``, numbers, else the string."""
    import yaml

    try:
        value = yaml.safe_load(text) if text else text
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.epochs=10"`` -> ``("optim.epochs", 10)``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. optim.epochs=10)")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value.strip())


def build_config(preset: str | None = None, overrides: list[str] | dict | None = None):
    """Default config <- preset <- overrides. Returns an OmegaConf structured (typed) config."""
    cfg = OmegaConf.structured(Config)
    if preset:
        if preset not in PRESETS:
            close = difflib.get_close_matches(preset, PRESETS, n=3)
            raise ConfigError(
                f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
            )
        cfg = OmegaConf.merge(cfg, PRESETS[preset])
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = [parse_override(ov) for ov in overrides or []]
    known = _all_keys(cfg)
    for key, value in items:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            if not close:
                leaf = key.split(".")[-1]
                close = [k for k in known if k.endswith("." + leaf)][:3]
            hint = f"; did you mean {', '.join(close)}?" if close else "; run `ibot config` to list every key"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as err:
            raise ConfigError(f"bad value {value!r} for {key}: {err.msg.splitlines()[0]}") from err
    validate(cfg)
    cfg.mask.enabled = student_masked(cfg)  # explicit in every saved config (see saved_config)
    return cfg


def student_masked(cfg) -> bool:
    """Whether the student's global crops are masked: ``mask.enabled``, or when null the method's
    default: method=ibot masks (official ``--use_masked_im_modeling`` defaults to true, also with
    ``--lambda2 0``), method=dino never does."""
    return cfg.method == "ibot" if cfg.mask.enabled is None else bool(cfg.mask.enabled)


def _range_problems(cfg) -> list[str]:
    """One ``key=value ... (allowed ...)`` line per value outside its allowed range."""
    problems = []

    def need(key: str, ok, allowed: str) -> None:
        section, _, leaf = key.partition(".")
        value = cfg[section][leaf] if leaf else cfg[section]
        if value is None:
            return
        try:
            good = bool(ok(value))
        except (TypeError, ValueError):
            good = False
        if not good:
            shown = list(value) if OmegaConf.is_list(value) else value
            problems.append(f"{key}={shown!r} is invalid (allowed: {allowed})")

    def at_least(keys: str, lo: float, integer: bool = True) -> None:
        for key in keys.split():
            need(key, lambda v: v >= lo, f"{'an integer' if integer else 'a number'} >= {lo:g}")

    positive = lambda v: v > 0  # noqa: E731
    unit = lambda v: 0 <= v <= 1  # noqa: E731
    at_least("model.patch_size model.img_size model.embed_dim model.depth model.num_heads model.window_size", 1)
    at_least("model.out_dim model.patch_out_dim model.hidden_dim model.bottleneck_dim model.head_layers", 1)
    need("model.in_chans", lambda v: v in (1, 3), "1 (grayscale) or 3 (RGB)")
    need("model.depths", lambda v: len(v) >= 1 and all(x >= 1 for x in v), "a non-empty list of integers >= 1")
    need("model.stage_heads", lambda v: len(v) >= 1 and all(x >= 1 for x in v), "a non-empty list of integers >= 1")
    need("model.drop_path", lambda v: 0 <= v < 1, "0 <= drop_path < 1")
    need("model.head_act", lambda v: v in ("gelu", "relu"), "'gelu' or 'relu'")
    need("mask.ratio", lambda v: len(v) >= 1 and all(0 <= x < 1 for x in v), "a non-empty list of values in [0, 1)")
    need("mask.ratio_var", lambda v: len(v) >= 1 and all(x >= 0 for x in v), "a non-empty list of values >= 0")
    at_least("mask.start_epoch", 0)
    at_least("mask.min_patches", 1)
    at_least("loss.lambda1 loss.lambda2 loss.koleo_weight", 0, integer=False)
    for key in ("loss.student_temp", "loss.warmup_teacher_temp", "loss.teacher_temp"):
        need(key, positive, "a temperature > 0")
    for key in ("loss.warmup_teacher_patch_temp", "loss.teacher_patch_temp"):
        need(key, positive, "a temperature > 0")
    at_least("loss.warmup_teacher_temp_epochs", 0)
    need("loss.center_momentum", unit, "0 <= center_momentum <= 1")
    at_least("loss.sinkhorn_iterations", 1)
    scale = lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1  # noqa: E731
    need("data.global_crops_scale", scale, "[min, max] with 0 < min <= max <= 1")
    need("data.local_crops_scale", scale, "[min, max] with 0 < min <= max <= 1")
    at_least("data.global_crops_number data.local_crop_size data.synthetic_size", 1)
    at_least("data.local_crops_number data.num_workers data.limit data.steps_per_epoch", 0)
    at_least("data.shuffle_buffer", 1)
    at_least("data.blur_scale", 0, integer=False)
    need("data.max_skip_fraction", unit, "a fraction in [0, 1]")
    at_least("optim.epochs optim.batch_size", 1)
    need("optim.lr", positive, "a learning rate > 0")
    at_least("optim.min_lr optim.warmup_epochs optim.weight_decay optim.weight_decay_end optim.clip_grad", 0, False)
    at_least("optim.freeze_last_layer", 0)
    need("optim.momentum_teacher", unit, "an EMA momentum in [0, 1]")
    need("optim.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "[beta1, beta2], each in [0, 1)")
    need("run.output_dir", lambda v: v.strip() and not Path(v).expanduser().is_file(), "a folder, not a file")
    need(
        "run.device", lambda v: v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v), "auto, cpu, cuda, cuda:N"
    )
    at_least("run.threads run.save_every_steps run.saveckp_freq run.knn_every run.knn_train_limit run.max_steps", 0)
    at_least("run.save_every_minutes run.time_limit_min", 0, integer=False)
    at_least("run.log_every run.knn_k run.max_bad_steps", 1)
    need("run.knn_temperature", positive, "a temperature > 0")
    need(
        "model.arch", _known_arch, "a plain timm model name, e.g. vit_small_patch16_224; see timm.list_models('vit_*')"
    )
    return problems


def _known_arch(name: str) -> bool:
    """A plain timm architecture name (no ``hf-hub:`` / ``local-dir:`` sources, no pretrained tags)."""
    import timm

    return bool(re.fullmatch(r"[a-z0-9_]+", name)) and timm.is_model(name)


def _choice_problems(cfg) -> list[str]:
    """Values outside their set of choices, probabilities, the hold-out share."""
    m, d, o, lo, mk = cfg.model, cfg.data, cfg.optim, cfg.loss, cfg.mask
    problems = []
    choices = {
        "method": (cfg.method, ("ibot", "dino")),
        "mask.shape": (mk.shape, ("block", "rand")),
        "loss.centering": (lo.centering, ("center", "sinkhorn")),
        "loss.patch_center": (lo.patch_center, ("all", "masked")),
        "data.pipeline": (d.pipeline, ("auto", "pil", "tensor", "gpu")),
        "data.dataset": (d.dataset, DATASET_NAMES),
        "optim.clip_mode": (o.clip_mode, ("param", "global")),
        "run.knn_split": (cfg.run.knn_split, ("test", "val")),
        "run.precision": (cfg.run.precision, ("auto", "fp32", "bf16", "fp16")),
        "model.head_norm": (m.head_norm, ("none", "bn", "ln")),
        "run.wandb_mode": (cfg.run.wandb_mode, ("offline", "online", "disabled")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            problems.append(f"{key}={value!r} is not one of {allowed}")
    loggers = ("tensorboard", "csv", "wandb")
    problems += [f"run.loggers has {x!r}, not one of {loggers}" for x in cfg.run.loggers if x not in loggers]
    probabilities = {"data.color_jitter_p": d.color_jitter_p, "data.solarization_p": d.solarization_p}
    probabilities["mask.probability"] = mk.probability
    problems += [f"{k}={v} is not a probability in [0, 1]" for k, v in probabilities.items() if not 0 <= v <= 1]
    if not 0 <= d.holdout < 1:
        problems.append(f"data.holdout={d.holdout} must be in [0, 1) (the share of each class held out for evaluation)")
    if d.val_path and d.dataset not in ("wds", "hf"):
        problems.append("data.val_path is for data.dataset=wds or hf; an imagefolder evaluates on its val/ folder")
    if d.streaming and d.dataset != "hf":
        problems.append(f"data.streaming is for data.dataset=hf, not {d.dataset}; set data.streaming=false")
    if d.streaming and d.limit:
        problems.append("data.limit is for map-style data; a stream's epoch length is data.steps_per_epoch")
    if d.steps_per_epoch and not d.streaming:
        problems.append("data.steps_per_epoch is for data.streaming=true; other datasets' epochs are their images")
    return problems


def _shape_problems(cfg) -> list[str]:
    """Sizes that do not fit together: crops and patches, widths and heads, Swin-only keys."""
    m, d = cfg.model, cfg.data
    problems = []
    cell = mask_cell(cfg)
    if m.img_size % cell:
        what = "the Swin mask cell (model.patch_size x 8)" if cell != m.patch_size else "model.patch_size"
        problems.append(f"model.img_size={m.img_size} is not divisible by {what} = {cell}")
    if d.local_crops_number and d.local_crop_size % m.patch_size:
        problems.append(f"data.local_crop_size={d.local_crop_size} is not divisible by model.patch_size={m.patch_size}")
    if m.embed_dim and m.num_heads and m.embed_dim % m.num_heads:
        problems.append(f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}")
    if m.depths and m.stage_heads and len(m.depths) != len(m.stage_heads):
        problems.append("model.depths and model.stage_heads need one value per stage (the same length)")
    swin_only = {"model.window_size": m.window_size, "model.depths": m.depths, "model.stage_heads": m.stage_heads}
    if not m.arch.startswith("swin"):
        problems += [f"{k} applies to Swin backbones only (model.arch={m.arch!r})" for k, v in swin_only.items() if v]
    elif m.depth is not None or m.num_heads is not None:
        problems.append("a Swin backbone takes model.depths and model.stage_heads (lists), not model.depth/num_heads")
    return problems


def _combination_problems(cfg) -> list[str]:
    """Options that exclude each other (FSDP, compile, efficient drop path) and impossible recipes."""
    m, d, o, lo, mk = cfg.model, cfg.data, cfg.optim, cfg.loss, cfg.mask
    problems = []
    for r, v in zip(
        mk.ratio, mk.ratio_var if len(mk.ratio_var) > 1 else list(mk.ratio_var) * len(mk.ratio), strict=False
    ):
        if v > r or r + v > 1:
            problems.append(f"mask.ratio {r} +/- mask.ratio_var {v} leaves [0, 1]; lower mask.ratio_var")
    if lo.lambda1 == 0 and (lo.lambda2 == 0 or cfg.method == "dino"):
        problems.append("loss.lambda1 and loss.lambda2 are both 0: nothing to train")
    if cfg.run.fsdp and m.head_norm == "bn":
        problems.append("run.fsdp=true does not support model.head_norm=bn (SyncBatchNorm); use none or ln")
    if m.arch.startswith("swin") and m.efficient_drop_path:
        problems.append("model.efficient_drop_path is implemented for ViT backbones only")
    if m.arch.startswith("swin") and cfg.run.compile:
        problems.append("run.compile (per-block torch.compile) is implemented for ViT backbones only")
    if cfg.run.compile_mode not in ("blocks", "full"):
        problems.append(f"run.compile_mode must be blocks or full, got {cfg.run.compile_mode!r}")
    elif cfg.run.compile and cfg.run.compile_mode == "full":
        if lo.centering != "center":
            problems.append("run.compile_mode=full needs loss.centering=center (padded tokens would enter Sinkhorn)")
        if cfg.run.fsdp:
            problems.append("run.compile_mode=full is not supported with run.fsdp=true; use run.compile_mode=blocks")
    if d.global_crops_number < 1 or d.global_crops_number + d.local_crops_number < 2:
        problems.append("need at least 1 global crop and 2 crops in all")
    # (no check of loss.warmup_teacher_temp_epochs against optim.epochs: the official code sizes a numpy
    # array by epochs and fails when the warm-up is longer; ibot's schedule is a function of the epoch)
    if o.warmup_epochs > o.epochs:
        problems.append(f"optim.warmup_epochs={o.warmup_epochs} > optim.epochs={o.epochs}")
    if cfg.method == "dino" and mk.enabled:
        problems.append("method=dino never masks; for the official --lambda2 0 use method=ibot loss.lambda2=0")
    if cfg.method == "ibot" and lo.lambda2 > 0 and mk.enabled is False:
        problems.append(
            f"loss.lambda2={lo.lambda2} needs masked student crops; drop mask.enabled=false or set loss.lambda2=0"
        )
    if m.shared_head and m.out_dim != m.patch_out_dim and cfg.method == "ibot":
        problems.append("model.shared_head needs model.out_dim == model.patch_out_dim")
    if len(mk.ratio) != len(mk.ratio_var) and len(mk.ratio_var) != 1:
        problems.append("mask.ratio and mask.ratio_var must have the same length")
    return problems


def validate(cfg) -> None:
    """Impossible values and combinations are errors before any heavy work.

    Every value is checked against its allowed range; the error is one line naming each bad key,
    its value and what is allowed.
    """
    problems = _choice_problems(cfg)
    ranges = _range_problems(cfg)
    problems += ranges
    if ranges:  # the combination checks below assume values in range
        raise ConfigError("invalid config: " + "; ".join(problems))
    problems += _shape_problems(cfg) + _combination_problems(cfg)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def mask_cell(cfg) -> int:
    """Pixels per mask cell of the config's backbone (:func:`ibot.grid.mask_cell`, what the
    built backbone's ``mask_cell`` is): the ViT patch, or for Swin the final-stage cell (official
    ``patch_size * 8``)."""
    from ibot.grid import mask_cell as backbone_mask_cell

    m = cfg.model
    return backbone_mask_cell(m.arch, m.patch_size, len(m.depths) if m.depths else None)


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dict -> ``{"section.key": value}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def unflatten(flat: dict) -> dict:
    """``{"section.key": value}`` -> nested dict (the inverse of :func:`flatten`)."""
    out: dict = {}
    for key, value in flat.items():
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def saved_config(d: dict) -> tuple[dict, list[str]]:
    """A config a checkpoint saved (any ibot version) as this version reads it, and the keys it holds
    that this version does not know (left out; the caller warns or refuses).

    Configs saved before ``mask.enabled`` was resolved hold null there, which then meant "masked only
    with a patch loss"; it is read with that meaning, so the saved model keeps its (absent) mask token.
    """
    known = set(_all_keys(OmegaConf.structured(Config)))
    flat = flatten(d)
    unknown = sorted(k for k in flat if k not in known)
    kept = {k: v for k, v in flat.items() if k in known}
    if kept.get("mask.enabled") is None:
        kept["mask.enabled"] = kept.get("method", "ibot") == "ibot" and kept.get("loss.lambda2", 1.0) > 0
    return unflatten(kept), unknown


def from_dict(d: dict):
    """The config of a saved dict (:func:`saved_config`; keys this version does not know are an error)."""
    kept, unknown = saved_config(d)
    if unknown:
        raise ConfigError(f"unknown config keys {', '.join(unknown)} (saved by a newer ibot?)")
    cfg = OmegaConf.merge(OmegaConf.structured(Config), kept)
    validate(cfg)
    return cfg

"""``ibot`` command line: a thin layer over the library.

ibot pretrain preset=fmnist_tiny optim.epochs=3 run.output_dir=runs/x
ibot pretrain --resume runs/x
ibot knn runs/x
ibot config preset=smoke
"""

from __future__ import annotations

import argparse
import json
import sys

from ibot import __version__

FINETUNE_MAX_FOLDER_IMAGES = 20000  # decoded into memory (uint8) for the fine-tuning loop

EXAMPLES = """examples:
  ibot pretrain preset=fmnist_tiny                      # Fashion-MNIST on the CPU, then k-NN
  ibot pretrain preset=smoke run.output_dir=runs/smoke  # seconds, synthetic data
  ibot pretrain preset=vit_small_in1k data.path=/data/imagenet   # the official ViT-S/16 recipe
  ibot pretrain --resume runs/fmnist_tiny               # continue a stopped run
  ibot knn runs/fmnist_tiny                             # k-NN of a run's teacher
  ibot linear runs/fmnist_tiny                          # linear probe
  ibot finetune runs/fmnist_tiny --epochs 3             # fine-tune with a linear head
  ibot finetune RUN --dataset imagefolder --data DIR    # a folder of class sub-folders (settings fitted to its size)
  ibot export runs/fmnist_tiny --out exported/          # timm-loadable safetensors
  ibot config preset=fmnist_tiny                        # print the resolved config
  ibot shards /data/imagenet/train --out /data/in1k-wds # WebDataset shards; then pretrain data.path=DIR
  ibot config --explain                                 # every key with its meaning
  ibot pretrain --config runs/x/config.json optim.epochs=5 run.output_dir=runs/y   # a saved config as input
"""


def _split_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    preset, rest = None, []
    for it in items:
        if it.startswith("preset="):
            preset = it.split("=", 1)[1]
        else:
            rest.append(it)
    return preset, rest


def config_file_overrides(path: str) -> list[str]:
    """A JSON or YAML config file (a run's ``config.json``, or a partial one) as ``key=value`` overrides."""
    from pathlib import Path

    import yaml

    from ibot.config import ConfigError, flatten

    try:
        data = yaml.safe_load(Path(path).read_text())  # JSON is YAML
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the config file {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a config file (a mapping like the config.json of a run folder)")
    return [f"{k}={json.dumps(v)}" for k, v in flatten(data).items()]


def _known_errors():
    """Anticipated failures: one line ``ibot: error: ...`` with the fix, no traceback (``--debug`` shows it)."""
    from ibot.config import ConfigError
    from ibot.data.datasets import DatasetError
    from ibot.device import DeviceError
    from ibot.eval.protocols import EvalError
    from ibot.io import CheckpointError

    training = _loaded("ibot.train.trainer.TrainingError", "ibot.train.runlock.RunLockError")
    return (ConfigError, DatasetError, CheckpointError, *training, DeviceError, EvalError, NotImplementedError)


def _loaded(*names: str) -> tuple:
    """The classes ``module.Class`` among ``names`` whose module the command imported: an error class of
    a module never imported cannot have been raised (``ibot knn`` of an export never imports ibot.train)."""
    found = []
    for name in names:
        module, _, cls = name.rpartition(".")
        if module in sys.modules:
            found.append(getattr(sys.modules[module], cls))
    return tuple(found)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:  # e.g. "Permission denied: 'runs/x/out.png'"
        return f"{err.strerror}: {err.filename!r}" if err.filename else err.strerror
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not an integer >= 1")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a fraction in (0, 1)")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a number >= 0 (0 turns it off)")
    return value


def _smoothing(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1) (0 turns it off)")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the subcommand parsers inherit it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def cmd_pretrain(args) -> int:

    from ibot.builders.sources import resolve_source
    from ibot.config import build_config, flatten, parse_override
    from ibot.train.checkpoint import resume_config
    from ibot.train.trainer import Trainer

    preset, overrides = _split_overrides(args.overrides)
    preset = preset or args.preset
    if args.config:
        overrides = config_file_overrides(args.config) + overrides
    if args.resume:
        ckpt = resolve_source(args.resume, checkpoint_only=True)
        saved = flatten(resume_config(ckpt))
        cfg = build_config(None, {**saved, **dict(parse_override(o) for o in overrides)})
        cfg.run.output_dir = str(ckpt.parent)
        trainer = Trainer(cfg, resume=str(ckpt))
    else:
        from ibot.recipe import resolve_pretrain_config

        cfg, lines = resolve_pretrain_config(preset, overrides)
        for line in lines:
            print(line)
        trainer = Trainer(cfg, resume="never" if args.fresh else "auto")
    result = trainer.fit()
    knn = result.get("knn")
    if knn:
        from ibot.eval.baselines import score_line

        print(
            f"RESULT {score_line('k-NN top-1', knn['top1'], knn['n_test'], knn.get('baselines'))} (k={knn['k']}) "
            f"on {knn.get('split', 'the test split')} | run folder {cfg.run.output_dir}"
        )
    return 0


def cmd_knn(args) -> int:
    from ibot.eval.protocols import run_knn

    res = run_knn(
        args.source,
        which=args.which,
        dataset=_eval_dataset(args),
        data_path=args.data,
        ks=tuple(args.ks),
        temperature=args.temperature,
        pool=args.pool,
        cache=args.cache,
        image_size=args.img_size,
        device=args.device,
        allow_unsafe=args.allow_unsafe_pickle,
        log=lambda m: print(m, file=sys.stderr),
        **_eval_loop_args(args),
    )
    print(f"k-NN queries: {res['split']}")
    for k, v in res["knn"].items():
        print(f"k-NN {res['which']} {res['pool']} k={k:>3}: top-1 {v['top1']:.2f}%  top-5 {v['top5']:.2f}%")
    if res.get("baselines"):
        from ibot.eval.baselines import score_line

        k = "20" if "20" in res["knn"] else next(iter(res["knn"]))
        base = {name: b[k] for name, b in res["baselines"].items()}
        print(f"{score_line(f'k-NN k={k}', res['knn'][k]['top1'], res['n_test'], base)} ({res['n_test']} queries)")
    if args.json:
        print(json.dumps(res))
    return 0


def _eval_loop_args(args) -> dict:
    """The feature-extraction settings shared by ``knn`` and ``linear``."""
    return dict(
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        limit=args.limit,
        progress=not args.no_progress,
        baselines=not args.no_baselines,
    )


def _eval_dataset(args) -> str | None:
    """``--dataset``, else what ``--data DIR`` holds when it is an image folder (class sub-folders:
    imagefolder; loose images: folder, refused with the fix), else None (the run's dataset)."""
    if args.dataset or not args.data:
        return args.dataset
    from ibot.data_setup import inspect_folder

    found = inspect_folder(args.data)
    if found is None:
        return None
    if found["dataset"] == "imagefolder":
        print(f"--data {args.data}: an ImageFolder with {len(found['classes'])} classes", file=sys.stderr)
    return found["dataset"]


def cmd_linear(args) -> int:
    from ibot.eval.protocols import run_linear

    res = run_linear(
        args.source,
        which=args.which,
        dataset=_eval_dataset(args),
        data_path=args.data,
        n_last_blocks=args.n_last_blocks,
        avgpool=args.avgpool,
        epochs=args.epochs,
        cache=args.cache,
        val_fraction=args.val_fraction,
        device=args.device,
        allow_unsafe=args.allow_unsafe_pickle,
        log=lambda m: print(m, file=sys.stderr),
        **_eval_loop_args(args),
    )
    feats = f"last {res['n_last_blocks']} CLS" + (" + patch mean" if res["avgpool"] else "")
    print(
        f"linear probe ({res['which']}, {feats}): lr {res['best_lr']:.4g} (SGD base lr, scaled by batch/256; picked "
        f"among {res['n_lrs']} on {res['n_val']} validation images, {res['val_top1']:.2f}%); test top-1 "
        f"{res['test_top1']:.2f}%  top-5 {res['test_top5']:.2f}% on {res['split']}"
    )
    if res.get("baselines"):
        from ibot.eval.baselines import score_line

        line = score_line("linear", res["test_top1"], res["n_test"], res["baselines"])
        print(f"{line} ({res['n_test']} test images)")
    if args.json:
        print(json.dumps(res))
    return 0


def cmd_finetune(args) -> int:
    from ibot.builders.sources import load_backbone
    from ibot.device import resolve_device
    from ibot.eval.finetune import finetune
    from ibot.eval.protocols import resolve_data

    device = resolve_device(args.device)
    backbone, info, report = load_backbone(args.source, args.which, args.allow_unsafe_pickle)
    print(report, file=sys.stderr)
    train, test, name = resolve_data(info, args.dataset, args.data)
    if not hasattr(train, "images"):  # a folder: decoded into memory at the backbone's size, if it fits
        from ibot.data.datasets import in_memory

        if len(train) + len(test) > FINETUNE_MAX_FOLDER_IMAGES:
            print(
                f"ibot: error: finetune decodes a folder into memory and this one has {len(train) + len(test)} images "
                f"(> {FINETUNE_MAX_FOLDER_IMAGES}); fine-tune large folders with timm's train.py on `ibot export`",
                file=sys.stderr,
            )
            return 2
        print(f"finetune: decoding {len(train)} + {len(test)} images into memory", file=sys.stderr)
        train = in_memory(train, info["img_size"], info["in_chans"])
        test = in_memory(test, info["img_size"], info["in_chans"])
    res = finetune(
        backbone,
        train,
        test,
        num_classes=len(train.classes),
        image_size=info["img_size"],
        preset=args.preset,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        mixup=args.mixup,
        cutmix=args.cutmix,
        smoothing=args.smoothing,
        device=device,
        log=lambda m: print(m, file=sys.stderr),
    )
    print(
        f"fine-tuned ({res['preset']}, {res['epochs']} epochs) on {name}: test top-1 {res['test_top1']:.2f}% "
        f"on {res['split']} ({res['recipe']})"
    )
    if args.json:
        print(json.dumps(res))
    return 0


def cmd_export(args) -> int:
    from ibot.builders.sources import load_backbone
    from ibot.device import resolve_device
    from ibot.export import check_export, export_backbone

    device = resolve_device(args.device) if args.check else None
    backbone, info, report = load_backbone(args.source, args.which, args.allow_unsafe_pickle)
    print(report, file=sys.stderr)
    path = export_backbone(backbone, args.out, info)
    print(
        f"exported {args.which} backbone to {path} (+ config.json for timm, backbone.json); "
        f'load it with timm.create_model("local-dir:{path.parent}", pretrained=True)'
    )
    if args.check:
        diff = check_export(backbone, args.out, device)
        print(f"check: plain timm loads the export on {device}; features match the backbone (max |diff| {diff:.2e})")
    return 0


def cmd_viz(args) -> int:
    from pathlib import Path

    from ibot import viz
    from ibot.builders.sources import load_backbone
    from ibot.device import resolve_device

    if args.kind == "curves":
        from ibot.train.metrics import plot_curves

        path = plot_curves(args.source, args.out or Path(args.source) / "curves.png")
        if path is None:
            print(f"ibot: error: {args.source} has no metrics.jsonl", file=sys.stderr)
            return 2
        print(f"wrote {path}")
        return 0
    device = resolve_device(args.device)
    backbone, info, report = load_backbone(args.source, args.which, args.allow_unsafe_pickle)
    print(report, file=sys.stderr)
    backbone = backbone.to(device).eval()
    images = viz.load_images(
        info, files=args.images, dataset=args.dataset, data_path=args.data, n=args.n, size=args.img_size
    )
    mean, std = info["mean"], info["std"]
    if args.kind == "attention":
        out = viz.plot_attention(backbone, images, args.out or "attention.png", mean, std, args.threshold)
        print(f"wrote {out}")
    elif args.kind == "patterns":
        from ibot.builders.sources import load_head

        head = load_head(args.source, args.which, args.allow_unsafe_pickle).to(device).eval()
        paths = viz.plot_patterns(
            backbone,
            head,
            images,
            args.out or "patterns",
            mean,
            std,
            topk=args.topk,
            show=args.show,
            window=args.window,
            kind=args.type,
        )
        print(f"wrote {len(paths)} PNGs to {Path(paths[0]).parent if paths else args.out}")
    else:  # correspond
        pair = bool(args.images) and len(images) >= 2
        res = viz.correspond(backbone, images, args.out or "correspondence.png", mean, std, pair=pair)
        if not pair:
            acc, score = res["accuracy"], res["score"]
            print(
                f"correspondence accuracy {100 * acc:.1f}% (drawn image); over {score['n']} images "
                f"{100 * score['accuracy']:.1f}%, random matches {100 * score['chance']:.1f}%"
            )
        print(f"wrote {res['path']}")
    return 0


def cmd_shards(args) -> int:
    from ibot.data.shard_writer import write_shards

    write_shards(args.src, args.out, shard_size=args.shard_size, seed=args.seed, progress=not args.no_progress)
    return 0


def cmd_config(args) -> int:
    from omegaconf import OmegaConf

    from ibot.config import PRESETS
    from ibot.recipe import resolve_pretrain_config

    preset, overrides = _split_overrides(args.overrides)
    if args.config:
        overrides = config_file_overrides(args.config) + overrides
    cfg, lines = resolve_pretrain_config(preset, overrides)  # what `ibot pretrain` with these keys trains
    for line in lines:
        print(f"# {line}")
    if args.explain:
        from ibot.config_help import explain

        print(explain(cfg))
        return 0
    print(f"# presets: {', '.join(sorted(PRESETS))}")
    print(OmegaConf.to_yaml(cfg))
    return 0


def _finetune_parser(sub, source_args) -> None:
    ft = sub.add_parser(
        "finetune",
        help="fine-tune a backbone with a linear head (BEiT-style protocol; in-memory datasets and folders)",
        description="Fine-tune a copy of the backbone with a linear classifier: layer-wise lr decay, "
        "drop-path, mixup / cutmix, label smoothing, AdamW with warm-up and cosine decay, then report the top-1 "
        "on the held-out split. Runs on mnist, fashion_mnist, cifar10/100, synthetic (tested on their test split) "
        f"and on an ImageFolder (--dataset imagefolder --data DIR: one sub-folder per class, up to "
        f"{FINETUNE_MAX_FOLDER_IMAGES} images, decoded into memory; tested on DIR/val/ if there is one, else on "
        "the images held out of each class as for pretraining, 10%% by default). The batch size, epochs, warm-up, "
        "lr and mixup / cutmix / smoothing are fitted to the number of training images (mixup and cutmix off "
        "below 5,000 images, the official 0.8 / 1.0 from 500,000) and printed; the options below override them.",
    )
    source_args(ft)
    ft.add_argument(
        "--preset",
        choices=("tiny_cpu", "vit_small", "vit_base", "vit_large"),
        default="tiny_cpu",
        help="drop-path, layer decay, minimum epochs (official per-size recipes; tiny_cpu: 3 epochs)",
    )
    ft.add_argument("--epochs", type=_positive_int, help="default: >= 300 steps and >= the preset's epochs")
    ft.add_argument("--lr", type=float, help="base lr (default 4e-3 x batch / 128)")
    ft.add_argument("--batch-size", type=_positive_int, help="default: 1/16 of the training images, 16 to 128")
    ft.add_argument("--mixup", type=_non_negative, help="mixup alpha (default: 0 below 5k images, 0.2, 0.8 from 500k)")
    ft.add_argument("--cutmix", type=_non_negative, help="cutmix alpha (default: 0 below 500k images, then 1.0)")
    ft.add_argument("--smoothing", type=_smoothing, help="label smoothing (default 0.1)")
    ft.set_defaults(func=cmd_finetune)


def _device_arg(sp) -> None:
    sp.add_argument(
        "--device",
        default="auto",
        help="auto (default: CUDA when available, else CPU), cpu, cuda or cuda:N; bf16 autocast on CUDA",
    )


def _source_args(sp) -> None:
    sp.add_argument("source", help="run folder, ibot checkpoint, exported backbone, or official iBOT checkpoint")
    sp.add_argument("--which", choices=("teacher", "student"), default="teacher", help="default teacher")
    sp.add_argument("--dataset", help="dataset name (default: the run's)")
    sp.add_argument("--data", help="dataset folder (default: the run's)")
    sp.add_argument("--cache", help="feature cache file; reused only for the same weights and data")
    sp.add_argument("--json", action="store_true", help="also print the result as JSON")
    sp.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="load files that need arbitrary unpickling (only files you trust)",
    )
    _device_arg(sp)


def _eval_loop_options(sp) -> None:
    sp.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    sp.add_argument("--num-workers", type=int, default=0, help="image-decoding workers for folders (default 0)")
    sp.add_argument("--limit", type=int, default=0, help="use N images spread over each split (default all)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp.add_argument(
        "--no-baselines",
        action="store_true",
        help="do not also score raw pixels and the untrained model (cached in the run folder's baselines.json)",
    )


def _pretrain_parser(sub) -> None:
    pre = sub.add_parser(
        "pretrain",
        help="pretrain a ViT with iBOT (or DINO) from a preset plus key=value overrides",
        description="Pretrain from a preset (default fmnist_tiny) with key=value overrides on the typed config "
        "(see `ibot config`). Writes config.json, metrics.jsonl, TensorBoard logs, curves.png, checkpoint.pth and "
        "a k-NN score to run.output_dir; a run folder that already has a checkpoint is resumed.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pre.add_argument("overrides", nargs="*", metavar="key=value", help="preset=NAME and config overrides")
    pre.add_argument("--preset", help="preset name (same as preset=NAME)")
    pre.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (or a checkpoint file)")
    pre.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in the run folder")
    pre.add_argument(
        "--config", metavar="FILE", help="start from a JSON/YAML config (e.g. RUN/config.json); key=value still win"
    )
    pre.set_defaults(func=cmd_pretrain)


def _knn_parser(sub) -> None:
    knn = sub.add_parser(
        "knn",
        help="k-NN accuracy of a backbone (DINO / iBOT protocol)",
        description="Weighted k-NN (cosine, votes exp(sim/T)) on L2-normalised features: the train "
        "split is the memory bank, the held-out split the queries (test set, val/ folder, or the images an "
        "ImageFolder without val/ holds out: data.holdout of each class, seeded).",
    )
    _source_args(knn)
    knn.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200])
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument(
        "--pool",
        choices=("cls", "patchmean", "both"),
        default="cls",
        help="final-norm CLS (default), mean of patch tokens, or both concatenated",
    )
    knn.add_argument("--img-size", type=int, help="evaluation image size (default: the model's)")
    _eval_loop_options(knn)
    knn.set_defaults(func=cmd_knn)


def _linear_parser(sub) -> None:
    lin = sub.add_parser(
        "linear",
        help="linear probe on frozen features (lr sweep, picked on a validation split)",
        description="Train one linear classifier per learning rate (official sweep) on cached "
        "features of the train split minus a validation split; report the accuracy on the held-out split "
        "(as for knn) of the classifier that is best on validation.",
    )
    _source_args(lin)
    lin.add_argument("--n-last-blocks", type=_positive_int, default=4)
    lin.add_argument("--avgpool", action="store_true", help="append the mean of the final patch tokens")
    lin.add_argument("--epochs", type=_positive_int, default=30)
    lin.add_argument("--val-fraction", type=_fraction, default=0.1)
    _eval_loop_options(lin)
    lin.set_defaults(func=cmd_linear)


def _export_parser(sub) -> None:
    exp = sub.add_parser(
        "export",
        help="export a backbone as a folder timm loads by itself (local-dir:OUT)",
        description="Write OUT/backbone.safetensors (timm keys), OUT/config.json (timm's format: architecture, "
        "model_args with dynamic_img_size, pretrained_cfg with the evaluation preprocessing, num_classes=0) and "
        "OUT/backbone.json (ibot's metadata). Load with timm.create_model('local-dir:OUT', pretrained=True).",
    )
    exp.add_argument("source", help="run folder, ibot checkpoint, or official iBOT checkpoint")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--which", choices=("teacher", "student"), default="teacher")
    exp.add_argument("--allow-unsafe-pickle", action="store_true")
    exp.add_argument(
        "--check",
        action="store_true",
        help="load the written file with plain timm on --device and compare its features with the backbone's",
    )
    _device_arg(exp)
    exp.set_defaults(func=cmd_export)


def _viz_parser(sub) -> None:
    vz = sub.add_parser(
        "viz",
        help="pictures: attention maps, prototype patterns, correspondences, curves",
        description="attention: last-layer CLS attention per head; patterns: top-k patches of the "
        "most populated teacher prototypes; correspond: patch matches between two images or two "
        "views of one; curves: training curves of a run folder.",
    )
    vz.add_argument("kind", choices=("attention", "patterns", "correspond", "curves"))
    vz.add_argument("source", help="run folder, ibot checkpoint, exported backbone, or official checkpoint")
    vz.add_argument("--out", help="output PNG (a folder for patterns)")
    vz.add_argument("--images", nargs="+", help="image files (default: the first test images of the dataset)")
    vz.add_argument("--dataset", help="dataset name (default: the run's)")
    vz.add_argument("--data", help="dataset folder")
    vz.add_argument("--n", type=_positive_int, default=4, help="images to use (patterns: use many, e.g. 512)")
    vz.add_argument("--img-size", type=int, help="image size (default: the model's)")
    vz.add_argument("--which", choices=("teacher", "student"), default="teacher")
    vz.add_argument("--threshold", type=_fraction, help="attention: keep this share of the mass (official 0.6)")
    vz.add_argument("--type", choices=("patch", "cls"), default="patch", help="patterns: patch or CLS tokens")
    vz.add_argument("--topk", type=_positive_int, default=16)
    vz.add_argument("--show", type=_positive_int, default=8, help="patterns: how many prototypes")
    vz.add_argument("--window", type=_positive_int, default=3, help="patterns: context window in patches")
    vz.add_argument("--allow-unsafe-pickle", action="store_true")
    _device_arg(vz)
    vz.set_defaults(func=cmd_viz)


def _shards_parser(sub) -> None:
    sh = sub.add_parser(
        "shards",
        help="write WebDataset .tar shards (and an index.json) from an image folder or a Hugging Face dataset",
        description="Write OUT/shard-000000.tar ... of --shard-size samples (each image's bytes as KEY.EXT, its class "
        "index as KEY.cls for an ImageFolder) shuffled once (seeded), and OUT/index.json (class names and every "
        "sample's byte range). Train on them with `ibot pretrain data.path=OUT` (data.dataset=wds).",
    )
    sh.add_argument(
        "src",
        help="an ImageFolder (SRC/CLASS/*.jpg), a folder of unlabelled images, or a Hugging Face save_to_disk / "
        "Parquet folder",
    )
    sh.add_argument("--out", required=True, help="output folder (new or without shards)")
    sh.add_argument("--shard-size", type=_positive_int, default=5000, help="samples per shard (default 5000)")
    sh.add_argument("--seed", type=int, default=0, help="seed of the one shuffle of the samples (default 0)")
    sh.add_argument("--no-progress", action="store_true", help="no progress bar")
    sh.set_defaults(func=cmd_shards)


def _config_parser(sub) -> None:
    cfg = sub.add_parser(
        "config",
        help="print the resolved config of a preset with overrides (--explain: what each key means)",
        description="Print every config key with its value (preset=NAME key=value ...); with --explain, one "
        "line per key with its value and its meaning.",
    )
    cfg.add_argument("overrides", nargs="*", metavar="key=value")
    cfg.add_argument("--explain", action="store_true", help="one line per key: value and meaning")
    cfg.add_argument("--config", metavar="FILE", help="start from a JSON/YAML config file")
    cfg.set_defaults(func=cmd_config)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ibot",
        description="iBOT self-supervised pretraining of Vision Transformers: pretrain, evaluate, inspect.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"ibot {__version__}")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of every error (also after COMMAND)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_pretrain_parser, _knn_parser, _linear_parser):
        add(sub)
    _finetune_parser(sub, _source_args)
    for add in (_export_parser, _viz_parser, _shards_parser, _config_parser):
        add(sub)
    return p


def interrupted_message(args) -> str:
    """What to tell the user after Ctrl-C: the command that stopped, and how to go on."""
    if args.command == "pretrain":
        dirs = [o.split("=", 1)[1] for o in args.overrides if o.startswith("run.output_dir=")]
        run = args.resume or (dirs[-1] if dirs else "RUN_DIR")
        return f"ibot: pretrain interrupted; the last checkpoint is kept: continue with `ibot pretrain --resume {run}`"
    what = " ".join(x for x in (args.command, getattr(args, "kind", None), getattr(args, "source", None)) if x)
    return f"ibot: `ibot {what}` interrupted; run it again to start over"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 an anticipated error, 128 + N stopped by signal N).

    Anticipated failures (bad values, missing or corrupt files, OS errors) print one line; anything
    else is a bug in ibot and prints its traceback.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except _loaded("ibot.train.signals.SignalStopError") as err:
        print(f"ibot: {err}", file=sys.stderr)
        return 128 + err.signum
    except (*_known_errors(), OSError) as err:
        if debug:
            raise
        print(f"ibot: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(interrupted_message(args), file=sys.stderr)
        return 130
    except Exception as err:
        import traceback

        traceback.print_exc()
        print(f"ibot: internal error ({type(err).__name__}); this is a bug, please report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

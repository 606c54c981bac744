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

EXAMPLES = """examples:
  ibot pretrain preset=fmnist_tiny                      # Fashion-MNIST on the CPU, then k-NN
  ibot pretrain preset=smoke run.output_dir=runs/smoke  # seconds, synthetic data
  ibot pretrain preset=vit_small_in1k data.path=/data/imagenet   # the official ViT-S/16 recipe
  ibot pretrain --resume runs/fmnist_tiny               # continue a stopped run
  ibot knn runs/fmnist_tiny                             # k-NN of a run's teacher
  ibot config preset=fmnist_tiny                        # print the resolved config
"""


def _split_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    preset, rest = None, []
    for it in items:
        if it.startswith("preset="):
            preset = it.split("=", 1)[1]
        else:
            rest.append(it)
    return preset, rest


def _known_errors():
    from ibot.config import ConfigError
    from ibot.data.datasets import DatasetError
    from ibot.train.checkpoint import CheckpointError
    from ibot.train.trainer import TrainingError

    return (ConfigError, DatasetError, CheckpointError, TrainingError)


def cmd_pretrain(args) -> int:
    from pathlib import Path

    from ibot.config import build_config, from_dict, to_dict
    from ibot.train.checkpoint import load_safe
    from ibot.train.trainer import CHECKPOINT, Trainer

    preset, overrides = _split_overrides(args.overrides)
    preset = preset or args.preset
    if args.resume:
        ckpt = Path(args.resume)
        ckpt = ckpt / CHECKPOINT if ckpt.is_dir() else ckpt
        saved = load_safe(ckpt)["config"]
        cfg = build_config(None, [])
        cfg = from_dict(saved)
        if overrides:
            cfg = build_config(None, {**_flat_dict(to_dict(cfg)), **dict(_kv(o) for o in overrides)})
        cfg.run.output_dir = str(ckpt.parent)
        trainer = Trainer(cfg, resume=str(ckpt))
    else:
        cfg = build_config(preset or "fmnist_tiny", overrides)
        trainer = Trainer(cfg, resume="never" if args.fresh else "auto")
    result = trainer.fit()
    knn = result.get("knn")
    if knn:
        print(f"RESULT k-NN top-1 {knn['top1']:.2f}% (k={knn['k']}) | run folder {cfg.run.output_dir}")
    return 0


def _kv(text: str):
    from ibot.config import ConfigError, parse_value

    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    k, v = text.split("=", 1)
    return k.strip(), parse_value(v.strip())


def _flat_dict(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def cmd_knn(args) -> int:
    from pathlib import Path

    from ibot.train.trainer import CHECKPOINT, Trainer, config_from_checkpoint

    ckpt = Path(args.run)
    ckpt = ckpt / CHECKPOINT if ckpt.is_dir() else ckpt
    cfg = config_from_checkpoint(ckpt)
    cfg.run.knn_k = args.k
    cfg.run.knn_train_limit = args.train_limit
    if args.data:
        cfg.data.path = args.data
    trainer = Trainer(cfg, resume=str(ckpt))
    res = trainer.evaluate_knn()
    if res is None:
        return 1
    print(json.dumps(res["all"]))
    return 0


def cmd_config(args) -> int:
    from omegaconf import OmegaConf

    from ibot.config import PRESETS, build_config

    preset, overrides = _split_overrides(args.overrides)
    cfg = build_config(preset, overrides)
    print(f"# presets: {', '.join(sorted(PRESETS))}")
    print(OmegaConf.to_yaml(cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ibot",
        description="iBOT self-supervised pretraining of Vision Transformers: pretrain, evaluate, inspect.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"ibot {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

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
    pre.set_defaults(func=cmd_pretrain)

    knn = sub.add_parser(
        "knn",
        help="k-NN accuracy of a run's teacher (DINO protocol)",
        description="Weighted k-NN (cosine, exp(sim/0.07)) on L2-normalised teacher CLS features: "
        "the train split is the memory bank, the test split the queries.",
    )
    knn.add_argument("run", help="run folder or checkpoint file")
    knn.add_argument("--k", type=int, default=20, help="neighbours for the headline number (default 20)")
    knn.add_argument("--train-limit", type=int, default=0, help="use at most N memory-bank images")
    knn.add_argument("--data", help="dataset location, if it moved since training")
    knn.set_defaults(func=cmd_knn)

    cfg = sub.add_parser(
        "config",
        help="print the resolved config of a preset with overrides",
        description="Print every config key with its value (preset=NAME key=value ...).",
    )
    cfg.add_argument("overrides", nargs="*", metavar="key=value")
    cfg.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
    except _known_errors() as err:
        print(f"ibot: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ibot: interrupted; resume with `ibot pretrain --resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

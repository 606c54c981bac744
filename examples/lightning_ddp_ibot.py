"""iBOT with PyTorch Lightning and Distributed Data Parallel.

Differences from the one-device example: DDP is enabled, Lightning shards the data with a
DistributedSampler, and a BatchNorm head (model.head_norm=bn) would be converted to SyncBatchNorm.
The schedules follow the per-process steps per epoch, which the module reads from the trainer.
On a CPU-only machine it runs 2 gloo processes:

    python examples/lightning_ddp_ibot.py           # the smoke preset, 2 CPU processes
    python examples/lightning_ddp_ibot.py devices=8 accelerator=gpu preset=vit_small_in1k data.path=/data/in1k
"""

import sys

import lightning as L

from ibot.config import build_config
from ibot.lightning import iBOTLightningModule, make_dataloader


def main(argv):
    opts = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in ("devices", "accelerator", "preset"))
    cfg = build_config(
        opts.get("preset", "smoke"), [a for a in argv if a.split("=", 1)[0] not in ("devices", "accelerator", "preset")]
    )
    devices = int(opts.get("devices", 2))
    loader = make_dataloader(cfg, num_workers=0)
    module = iBOTLightningModule(cfg)  # steps per epoch come from the trainer (per process)
    trainer = L.Trainer(
        max_epochs=cfg.optim.epochs,
        accelerator=opts.get("accelerator", "cpu"),
        devices=devices,
        strategy="ddp",
        sync_batchnorm=True,
        use_distributed_sampler=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, loader)
    if trainer.global_rank == 0:
        print(f"steps/epoch {module.niter}")
        print(f"final loss {float(trainer.callback_metrics['loss']):.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""iBOT with PyTorch Lightning on one device, with a k-NN score after every epoch.

python examples/lightning_ibot.py               # the smoke preset: seconds on a CPU
python examples/lightning_ibot.py optim.epochs=4

The module sizes its per-step schedules from the Lightning trainer, moves the data and the model
to each new epoch, and logs the loss terms, the schedules and the collapse monitors.
"""

import sys

import lightning as L

from ibot.config import build_config
from ibot.lightning import KNNCallback, iBOTLightningModule, make_dataloader


def main(argv):
    preset = next((a.split("=", 1)[1] for a in argv if a.startswith("preset=")), "smoke")
    cfg = build_config(preset, [a for a in argv if not a.startswith("preset=")])
    knn = KNNCallback.from_config(cfg)
    trainer = L.Trainer(
        max_epochs=cfg.optim.epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[knn],
    )
    module = iBOTLightningModule(cfg)
    trainer.fit(module, make_dataloader(cfg, num_workers=0))
    print(f"steps/epoch {module.niter}")
    for r in knn.results:
        print(f"epoch {r['epoch']}: k-NN top-1 {r['top1']:.2f}% (k={r['k']})")
    print(f"final loss {float(trainer.callback_metrics['loss']):.4f}")
    return trainer, module


if __name__ == "__main__":
    main(sys.argv[1:])

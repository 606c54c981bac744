"""iBOT with PyTorch Lightning on one device.

python examples/lightning_ibot.py               # the smoke preset: seconds on a CPU
"""

import sys

import lightning as L

from ibot.config import build_config
from ibot.lightning import iBOTLightningModule, make_dataloader


def main(argv):
    preset = next((a.split("=", 1)[1] for a in argv if a.startswith("preset=")), "smoke")
    cfg = build_config(preset, [a for a in argv if not a.startswith("preset=")])
    loader = make_dataloader(cfg, num_workers=0)
    module = iBOTLightningModule(cfg, steps_per_epoch=len(loader))
    trainer = L.Trainer(
        max_epochs=cfg.optim.epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, loader)
    print(f"final loss {float(trainer.callback_metrics['loss']):.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])

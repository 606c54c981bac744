"""The Lightning module's step boundaries (``ibot/lightning.py``)."""

import pytest

from ibot.builders.data import make_dataloader
from ibot.config import build_config


def test_teacher_is_updated_once_per_optimizer_step_under_gradient_accumulation(tmp_path, monkeypatch):
    """Issue 25 item 6: with accumulate_grad_batches=2, 2 optimizer steps gave 4 teacher updates."""
    lightning = pytest.importorskip("lightning")
    from ibot.lightning import iBOTLightningModule

    monkeypatch.chdir(tmp_path)
    cfg = build_config("smoke", ["optim.epochs=1", "run.knn_at_end=false"])  # 64 images / 16: 4 micro-batches
    module = iBOTLightningModule(cfg)
    momenta, update = [], module.model.update_teacher
    monkeypatch.setattr(module.model, "update_teacher", lambda m, *a, **k: momenta.append(m) or update(m, *a, **k))
    trainer = lightning.Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, make_dataloader(cfg))
    assert trainer.global_step == module.niter == 2
    assert momenta == [module.schedules[0].momentum, module.schedules[1].momentum]

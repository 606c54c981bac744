"""The in-training k-NN (``pretrain_knn``): the run's precision, and the search on every rank's device."""

from contextlib import nullcontext

import torch

from ibot import distributed as D
from ibot.builders.data import dataset_from_config
from ibot.builders.model import build_model
from ibot.config import build_config
from ibot.eval import knn, protocols


def test_in_training_knn_uses_the_runs_precision_and_searches_on_every_rank(monkeypatch):
    """Issue 25 item 8: extraction was forced into bf16 on CUDA even with run.precision=fp32 (the
    bf16 autocast of ``ibot knn`` is made visible on the CPU here), and only rank 0 searched, on its
    CPU, while the other ranks waited in the next collective."""
    cfg = build_config("smoke", ["run.progress=false", "run.knn_train_limit=0"])
    backbone = build_model(cfg).teacher["backbone"]
    bank = dataset_from_config(cfg, train=True)
    monkeypatch.setattr(knn, "inference_autocast", lambda dev: torch.autocast("cpu", dtype=torch.bfloat16))
    searched, classify = [], protocols.knn_classify

    def spy(bank_f, bank_y, query_f, query_y, **kw):
        searched.append((bank_f, kw.get("device")))
        return classify(bank_f, bank_y, query_f, query_y, **kw)

    monkeypatch.setattr(protocols, "knn_classify", spy)
    device = torch.device("cpu")
    res = protocols.pretrain_knn(backbone, cfg, bank, device=device, autocast=nullcontext())  # run.precision=fp32
    kw = dict(image_size=cfg.model.img_size, in_chans=cfg.model.in_chans)
    fp32, _ = knn.extract_features(backbone.forward_cls, bank, amp=False, **kw)
    bf16, _ = knn.extract_features(backbone.forward_cls, bank, **kw)
    assert not torch.allclose(bf16, fp32, atol=1e-4)  # the two precisions are told apart
    assert res is not None and torch.equal(searched[0][0], fp32) and searched[0][1] == device
    monkeypatch.setattr(D, "is_main", lambda: False)  # another rank: it searches too, and returns None
    assert protocols.pretrain_knn(backbone, cfg, bank, device=device, autocast=nullcontext()) is None
    assert len(searched) == 2 and searched[1][1] == device

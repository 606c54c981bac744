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


def _random_bank(n=97, m=31, d=16, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    return bank, torch.randint(0, c, (n,), generator=g), queries, torch.randint(0, c, (m,), generator=g)


def test_merged_top_k_of_bank_shards_equals_the_whole_bank_search():
    bank, by, q, qy = _random_bank()
    sim, lab = knn.knn_neighbours(bank, by, q, 20)
    parts = [knn.knn_neighbours(bank[s], by[s], q, 20) for s in (slice(0, 33), slice(33, 66), slice(66, 97))]
    msim, mlab = knn.merge_neighbours(parts, 20)
    assert torch.equal(msim, sim) and torch.equal(mlab, lab)
    assert knn.knn_votes(msim, mlab, qy, [5, 20], 0.07, 5) == knn.knn_classify(bank, by, q, qy, ks=(5, 20))


def _sharded_knn(rank, world, init, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    bank, by, q, qy = _random_bank()
    res = knn.knn_classify(bank, by, q, qy, ks=(5, 20, 200), shard=(rank, world))
    if rank == 0:
        torch.save(res, out)
    else:
        assert res is None
    dist.destroy_process_group()


def test_ranks_search_their_share_of_the_bank_and_the_main_rank_gets_the_whole_bank_result(tmp_path):
    """Issue 25 item 8: with the bank sharded over 3 gloo ranks (one holding fewer than k rows), rank 0's
    accuracies equal one process searching the whole bank."""
    import torch.multiprocessing as mp

    out = tmp_path / "res.pt"
    mp.spawn(_sharded_knn, args=(3, f"file://{tmp_path / 'init'}", str(out)), nprocs=3)
    bank, by, q, qy = _random_bank()
    assert torch.load(out) == knn.knn_classify(bank, by, q, qy, ks=(5, 20, 200))

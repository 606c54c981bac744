"""run.compile=full: the padded masked-token batch keeps the loss, and the whole forward compiles
into one graph (fullgraph=True) that neither a new mask count nor a new epoch recompiles."""

import pytest
import torch
from conftest import step_values
from test_step import _batch, _model

from ibot.train.compiled import PAD_LEVELS, compile_forward, mask_bound, pad_mask_batch, padded_size
from ibot.train.step import TrainStep


def test_padding_keeps_loss_and_gradients():
    model = _model(drop_path_rate=0.0)
    batch = _batch(0)
    padded = _batch(0)
    padded.masks = pad_mask_batch(padded.masks, 0.5)  # the test masks: ratio up to 0.3 + 0.2
    m = batch.masks.index.numel()
    assert padded.masks.index.numel() == padded_size(m, mask_bound(2 * 4, 16, 0.5)) > m
    a = model(batch=batch, epoch=1, update_centers=False)
    a.loss.backward()
    ga = [p.grad.clone() for p in model.trainable_parameters()]
    model.zero_grad(set_to_none=True)
    b = model(batch=padded, epoch=1, update_centers=False)
    b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-6, atol=1e-6)
    for x, p in zip(ga, model.trainable_parameters(), strict=True):
        torch.testing.assert_close(p.grad, x, rtol=1e-5, atol=1e-7)
    for name in ("cls_logits", "patch_mean_logits"):  # what the centers move with
        torch.testing.assert_close(getattr(b.targets, name).sum(0), getattr(a.targets, name).sum(0))


def test_masks_are_padded_to_a_few_tight_sizes_not_to_the_bound():
    """Issue 25 item 10: every batch was padded to max_ratio (about 0.5 N rows per image against about
    0.15 N used with the official ratios); now to the count rounded up to one of PAD_LEVELS sizes."""
    import random

    from ibot.data.masking import MaskBatch, MaskGenerator

    gen = MaskGenerator("block", [0.0, 0.3], [0.0, 0.2])  # the official ViT-S recipe
    n_img, n_tok = 2 * 64, 14 * 14
    bound = mask_bound(n_img, n_tok, gen.max_ratio)
    used, padded = [], []
    for seed in range(20):
        mb = MaskBatch.from_masks(gen(n_img, 14, 14, random.Random(seed)), 2)
        used.append(mb.index.numel())
        padded.append(pad_mask_batch(mb, gen.max_ratio).index.numel())
    assert all(u <= p <= u + bound / PAD_LEVELS + 1 for u, p in zip(used, padded, strict=True))
    assert len(set(padded)) <= 2 and max(padded) <= 0.5 * bound  # about 0.15 N of 0.5 N: a few sizes
    assert {padded_size(m, 64) for m in range(65)} == {8, 16, 24, 32, 40, 48, 56, 64}
    assert padded_size(0, 64) == 8 and padded_size(9, 64) == 16 and padded_size(3, 5) == 3


def test_padding_refuses_a_batch_over_the_bound():
    batch = _batch(0)
    with pytest.raises(ValueError, match="exceed the padding bound"):
        pad_mask_batch(batch.masks, 0.01)


def test_whole_forward_is_one_graph_across_mask_counts_and_epochs():
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = _model(drop_path_rate=0.0)
    ref = _model(drop_path_rate=0.0)
    ref.load_state_dict(model.state_dict())
    fwd = compile_forward(model, backend=counting_backend)
    step = TrainStep(model, fwd, clip_grad=3.0)
    ref_step = TrainStep(ref, clip_grad=3.0)
    for s in (step, ref_step):
        s.set_hyperparameters(1e-3, 0.04)
    counts, sizes = set(), set()
    for i, epoch in enumerate([0, 0, 1, 2]):  # the warm-up changes the temperatures every epoch
        batch = _batch(i)
        counts.add(batch.masks.index.numel())
        want = ref_step(batch, step_values(ref, epoch))
        batch.masks = pad_mask_batch(batch.masks, 0.5)
        sizes.add(batch.masks.index.numel())
        got = step(batch, step_values(model, epoch))
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert len(counts) > len(sizes)  # the mask counts differed more than the padded sizes
    assert len(graphs) == len(sizes)  # one graph per padded size, no breaks (fullgraph=True would raise)
    torch.testing.assert_close(model.cls_center.center, ref.cls_center.center, rtol=1e-5, atol=1e-7)


def test_full_compile_refuses_sinkhorn():
    with pytest.raises(ValueError, match="run.compile=blocks"):
        compile_forward(_model(centering="sinkhorn"), backend="eager")


def test_trainer_full_compile_matches_eager_losses(tmp_path, monkeypatch):
    import json

    from ibot.config import build_config
    from ibot.train import compiled
    from ibot.train.trainer import Trainer

    monkeypatch.setattr(compiled, "BACKEND", "eager")  # inductor would compile C++ for minutes on a CPU
    torch._dynamo.reset()
    base = ["run.progress=false", "run.knn_at_end=false", "run.max_steps=3", "model.drop_path=0.0"]
    curves = []
    for name, extra in (("eager", []), ("full", ["run.compile=true", "run.compile_mode=full"])):
        out = tmp_path / name
        tr = Trainer(build_config("smoke", [f"run.output_dir={out}", *base, *extra]), log=lambda *a: None)
        assert (tr.pad_ratio is not None) == (name == "full")
        tr.fit()
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        curves.append([r["loss"] for r in rows if "loss" in r])
    assert len(curves[0]) == 3
    assert curves[1] == pytest.approx(curves[0], rel=1e-5, abs=1e-6)


def test_full_compile_config_checks():
    from ibot.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="compile_mode must be blocks or full"):
        build_config("smoke", ["run.compile_mode=graph"])
    with pytest.raises(ConfigError, match="needs loss.centering=center"):
        build_config("smoke", ["run.compile=true", "run.compile_mode=full", "loss.centering=sinkhorn"])

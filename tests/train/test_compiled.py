"""run.compile=full: the padded masked-token batch keeps the loss, and the whole forward compiles
into one graph (fullgraph=True) that neither a new mask count nor a new epoch recompiles."""

import pytest
import torch
from conftest import step_values
from test_step import _batch, _model

from ibot.train.compiled import compile_forward, mask_bound, pad_mask_batch
from ibot.train.step import TrainStep


def test_padding_keeps_loss_and_gradients():
    model = _model(drop_path_rate=0.0)
    batch = _batch(0)
    padded = _batch(0)
    padded.masks = pad_mask_batch(padded.masks, 0.5)  # the test masks: ratio up to 0.3 + 0.2
    assert padded.masks.index.numel() == mask_bound(2 * 4, 16, 0.5) > batch.masks.index.numel()
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
    counts = set()
    for i, epoch in enumerate([0, 0, 1, 2]):  # the warm-up changes the temperatures every epoch
        batch = _batch(i)
        counts.add(batch.masks.index.numel())
        want = ref_step(batch, step_values(ref, epoch))
        batch.masks = pad_mask_batch(batch.masks, 0.5)
        got = step(batch, step_values(model, epoch))
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert len(counts) > 1  # the mask counts differed
    assert len(graphs) == 1  # one graph, no recompiles, no breaks (fullgraph=True would raise)
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

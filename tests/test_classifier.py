"""classifier(): ResNet-style classifiers with ResFlow or ImpFlow blocks."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from impflow.models.classifier import classifier

KINDS = ["resflow", "impflow"]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("in_shape", [(1, 8, 8), (5,)])
def test_logits_and_finite_gradients(kind, in_shape):
    model = classifier(in_shape, 4, block=kind, width=6, hidden=8)
    x = torch.randn(3, *in_shape)
    logits = model(x)
    assert logits.shape == (3, 4)
    F.cross_entropy(logits, torch.tensor([0, 1, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_equal_parameters_with_half_the_blocks():
    res, imp = (classifier((1, 8, 8), 10, block=k, width=8) for k in KINDS)
    assert len(res.blocks) == 4 and len(imp.blocks) == 2
    assert n_params(res) == n_params(imp)


def test_implicit_block_map_is_the_flow_forward():
    model = classifier((2, 4, 4), 3, block="impflow", blocks=1, width=2, hidden=4).double()
    block = model.blocks[0]
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert (block.map(x) - block(x)[0]).abs().max() < 1e-10


@pytest.mark.parametrize(
    "kwargs",
    [dict(block="resflow", width=8, hidden=8), dict(block="impflow", width=8, hidden=8),
     dict(block="impflow", stages=(4, 8), kernels=(3, 3))],
    ids=["resflow", "impflow", "impflow-stages"],
)
def test_training_on_digits_reduces_the_loss(kwargs):
    digits = load_digits()
    x = torch.tensor(digits.images[:128] / 16, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target[:128])
    model = classifier((1, 8, 8), 10, **kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_bad_arguments():
    with pytest.raises(ValueError, match="block"):
        classifier((1, 8, 8), 10, block="resnet")
    with pytest.raises(ValueError, match="in_shape"):
        classifier((8, 8), 10)


# --- multi-stage layout (stages=...) ---------------------------------------------------------


def test_single_stage_default_parameter_count_unchanged():
    # the single-stage layout of benchmarks/results/classify.md (width 16, 4 / 2 blocks)
    for kind in KINDS:
        model = classifier((1, 8, 8), 10, block=kind, width=16)
        assert n_params(model) == 20466
        assert len(model.downsample) == 0 and model.stage_blocks == [len(model.blocks)]


@pytest.mark.parametrize("kind", KINDS)
def test_stages_shapes_and_gradients(kind):
    model = classifier((1, 8, 8), 4, block=kind, stages=(4, 6, 8), kernels=(3, 3))
    assert model.stage_blocks == ([2, 2, 2] if kind == "resflow" else [1, 1, 1])
    assert len(model.blocks) == sum(model.stage_blocks) and len(model.downsample) == 2
    x = torch.randn(3, 1, 8, 8)
    assert model.features(x).shape == (3, 8, 2, 2)
    logits = model(x)
    assert logits.shape == (3, 4)
    F.cross_entropy(logits, torch.tensor([0, 1, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_stages_equal_parameters():
    res, imp = (classifier((1, 8, 8), 10, block=k, stages=(8, 16), kernels=(3, 3)) for k in KINDS)
    assert len(res.blocks) == 4 and len(imp.blocks) == 2
    assert n_params(res) == n_params(imp)
    # hidden scales with the stage width; blocks is per stage
    res, imp = (
        classifier((1, 8, 8), 10, block=k, stages=(4, 8), hidden=6, blocks=b, pool=1)
        for k, b in zip(KINDS, (4, 2))
    )
    assert res.blocks[-1].g.net[0].out_channels == 12
    assert len(res.blocks) == 8 and n_params(res) == n_params(imp)


def test_bad_stages():
    for bad in [(), (8, 0), (8, 2.5), 8, "8,16"]:
        with pytest.raises(ValueError, match="stages"):
            classifier((1, 8, 8), 10, stages=bad)
    with pytest.raises(ValueError, match="not both"):
        classifier((1, 8, 8), 10, width=8, stages=(8, 16))
    with pytest.raises(ValueError, match="image"):
        classifier((5,), 10, stages=(8, 16))
    with pytest.raises(ValueError, match="pool"):
        classifier((1, 8, 8), 10, stages=(2, 2, 2, 2))  # 8×8 -> 1×1 < pool 2

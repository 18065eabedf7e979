"""TensorFlow front ends: TensorFlow's printed vectors, TF's weights rule and
reductions, through both backends."""

import pytest
import torch

import fused_sigxent as fs
from conftest import assert_close, oracle_elementwise, oracle_reduce

# TF r1.12's documentation printed these float32 losses for a (2, 3, 3) batch.
SEED_002_LOGITS = [[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]],
                   [[-0.1, -0.2, -0.3], [-0.4, -0.5, -0.6], [-0.7, -0.8, -0.9]]]
SEED_002_LABELS = [[[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]],
                   [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]]
SEED_002_LOSS = [[[0.6443967, 0.59813887, 0.8543552], [0.91301525, 0.974077, 0.43748793],
                  [0.40318602, 0.3711007, 0.34115386]],
                 [[0.6443967, 0.59813887, 0.5543552], [0.5130153, 0.474077, 0.43748793],
                  [1.103186, 0.3711007, 1.2411538]]]
# TF 2.x's documentation printed these.
SEED_004_LOGITS = [1.0, -1.0, 0.0, 1.0, -1.0, 0.0, 0.0]
SEED_004_LABELS = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5]
SEED_004_LOSS = [1.3132617, 0.3132617, 0.6931472, 0.3132617, 1.3132617, 0.6931472, 0.6931472]
# "Exactly to float32 rounding": TF's and our float32 math may differ in the
# last bit of log1p/exp, so allow one unit in the last place of values < 2.
ULP = 2.0 ** -23 * 2

ELEMENTWISE = {
    "tf.nn": lambda z, x: fs.sigmoid_cross_entropy_with_logits(labels=z, logits=x),
    "flipped": lambda z, x: fs.deprecated_flipped_sigmoid_cross_entropy_with_logits(x, z),
    "weighted, pos_weight=1": lambda z, x: fs.weighted_cross_entropy_with_logits(labels=z, logits=x, pos_weight=1.0),
    "tf.losses NONE": lambda z, x: fs.sigmoid_cross_entropy(z, x, reduction=fs.Reduction.NONE),
}
TF_REDUCTIONS = {
    fs.Reduction.NONE: "none",
    fs.Reduction.SUM: "sum",
    fs.Reduction.MEAN: "mean",
    fs.Reduction.SUM_OVER_BATCH_SIZE: "numel",
    fs.Reduction.SUM_BY_NONZERO_WEIGHTS: "nonzero",
}


@pytest.mark.parametrize("front_end", list(ELEMENTWISE))
@pytest.mark.parametrize("seed", ["002", "004"])
def test_seed_vectors(backend, front_end, seed):
    logits, labels, expected = {
        "002": (SEED_002_LOGITS, SEED_002_LABELS, SEED_002_LOSS),
        "004": (SEED_004_LOGITS, SEED_004_LABELS, SEED_004_LOSS),
    }[seed]
    loss = ELEMENTWISE[front_end](torch.tensor(labels), torch.tensor(logits))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=0, atol=ULP)


def test_alias_and_string_values():
    assert fs.Reduction.SUM_OVER_NONZERO_WEIGHTS is fs.Reduction.SUM_BY_NONZERO_WEIGHTS
    x, z = torch.randn(3, 4), torch.rand(3, 4)
    a = fs.sigmoid_cross_entropy(z, x, reduction="weighted_mean")
    b = fs.sigmoid_cross_entropy(z, x, reduction=fs.Reduction.MEAN)
    assert torch.equal(a, b)


def tf_weight_cases(batch, classes):
    """TF's accepted weights: numbers, 0-d, [batch_size] (seed 003's promise),
    and rank-2 tensors whose dims are 1 or the logits'; some zeros, so the
    nonzero count differs from numel; all zeros, so denominators are 0."""
    w = torch.rand(batch, classes)
    w[w < 0.3] = 0
    return {
        "default 1.0": (1.0, torch.ones(())),
        "number": (2.5, torch.tensor(2.5)),
        "zero": (0.0, torch.zeros(())),
        "0-d": (torch.tensor(0.5), torch.tensor(0.5)),
        "[batch_size]": (w[:, 0], w[:, :1]),
        "(B, 1)": (w[:, :1], w[:, :1]),
        "(1, C)": (w[:1], w[:1]),
        "(B, C) with zeros": (w, w),
        "all zero": (torch.zeros(batch, classes), torch.zeros(batch, classes)),
    }


@pytest.mark.parametrize("reduction", list(TF_REDUCTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tf_losses_reductions_and_weights(backend, reduction, dtype):
    # (6, 11): ragged; rows differ so per-sample weights matter.
    x = (torch.randn(6, 11) * 3).to(dtype)
    z = torch.rand(6, 11).to(dtype)
    for name, (weights, broadcast) in tf_weight_cases(6, 11).items():
        for s in [0.0, 0.25]:
            xg, zg = x.clone().requires_grad_(), z.clone().requires_grad_()
            loss = fs.sigmoid_cross_entropy(zg, xg, weights, s, reduction)
            xd, zd = x.double().requires_grad_(), z.double().requires_grad_()
            expected = oracle_reduce(oracle_elementwise(xd, zd, None, s), broadcast, TF_REDUCTIONS[reduction])
            where = f"weights {name}, smoothing {s}"
            assert loss.dtype == dtype, where
            assert_close(loss, expected, dtype, msg=where)
            grad = torch.randn(loss.shape, dtype=torch.float64)
            got = torch.autograd.grad(loss, (xg, zg), grad.to(dtype))
            want = torch.autograd.grad(expected, (xd, zd), grad, allow_unused=True)
            for g, e in zip(got, want):
                assert_close(g, torch.zeros_like(g) if e is None else e, dtype, msg=where)


def test_integer_labels_and_weights_are_cast(backend):
    x = torch.randn(4, 5)
    z = (torch.rand(4, 5) > 0.5).long()
    w = torch.randint(0, 3, (4, 5))
    a = fs.sigmoid_cross_entropy(z, x, w, reduction=fs.Reduction.MEAN)
    b = fs.sigmoid_cross_entropy(z.float(), x, w.float(), reduction=fs.Reduction.MEAN)
    assert_close(a, b)


def test_weighted_cross_entropy_matches_definition(backend):
    x, z = torch.randn(5, 9, dtype=torch.float64) * 5, torch.rand(5, 9, dtype=torch.float64)
    for pos_weight in [3.0, torch.rand(9, dtype=torch.float64) * 4, torch.rand(5, 1, dtype=torch.float64)]:
        p = pos_weight if torch.is_tensor(pos_weight) else torch.tensor(pos_weight, dtype=torch.float64)
        loss = fs.weighted_cross_entropy_with_logits(labels=z, logits=x, pos_weight=pos_weight)
        assert_close(loss, oracle_elementwise(x, z, p))


def test_weights_rank_rule_rejects_what_tf_rejects():
    x, z = torch.randn(4, 6), torch.rand(4, 6)
    for bad in [torch.rand(6), torch.rand(4, 6, 1), torch.rand(2, 6), torch.rand(1, 1, 1)]:
        with pytest.raises(ValueError, match=r"weights of shape"):
            fs.sigmoid_cross_entropy(z, x, bad)
    with pytest.raises(ValueError, match="weights"):
        fs.sigmoid_cross_entropy(z, x, None)

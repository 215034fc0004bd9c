"""Loss terms on tiny inputs with known values, and the classify task's outputs they read."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import branchadapt as ba
from branchadapt import TaskContext
from branchadapt_timm.backbone import TimmBackbone, TimmOptions
from branchadapt_timm.losses import (
    AlignmentOptions,
    Entropy,
    EntropyOptions,
    FeatureAlignment,
    coral,
    moments,
)
from branchadapt_timm.task import ClassifyOptions, ClassifyTask


def outputs(logits=None, features=None, group=(0, 1, 1, 2)):
    group = torch.tensor(group)
    out = {"group": group, "anchor": group == 0}
    if logits is not None:
        out["logits"] = logits
    if features is not None:
        out["features"] = features
    return out


def test_entropy_known_values():
    uniform = outputs(torch.zeros(4, 10))
    assert float(Entropy()(uniform, {})) == pytest.approx(math.log(10))
    sure = torch.zeros(4, 10)
    sure[:, 3] = 60.0
    assert float(Entropy()(outputs(sure), {})) == pytest.approx(0.0, abs=1e-6)
    half = torch.full((4, 2), 0.0)  # two classes, 50/50: log 2
    assert float(Entropy()(outputs(half), {})) == pytest.approx(math.log(2))


def test_entropy_leaves_the_anchor_out_unless_asked():
    logits = torch.zeros(4, 10)
    logits[1:, 0] = 60.0  # few-shot rows are certain, the anchor row is uniform
    assert float(Entropy()(outputs(logits), {})) == pytest.approx(0.0, abs=1e-6)
    assert float(Entropy(EntropyOptions(on="all"))(outputs(logits), {})) == pytest.approx(math.log(10) / 4)
    only_anchor = outputs(torch.zeros(2, 10), group=(0, 0))
    assert float(Entropy()(only_anchor, {})) == 0.0
    with pytest.raises(ba.UserError, match="classify"):
        Entropy()({"logits": logits}, {})


def test_coral_and_moments_known_values():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    assert float(coral(x, x)) == 0.0 and float(moments(x, x)) == 0.0
    assert float(coral(x, x + 5.0)) == pytest.approx(0.0, abs=1e-5)  # covariance ignores a shift
    assert float(moments(x, x + 2.0)) == pytest.approx(4.0, rel=1e-5)  # mean gap 2 in every feature
    assert float(moments(x, 3 * x)) == pytest.approx(float((2 * x.std(0, unbiased=False)).pow(2).mean()) + float((2 * x.mean(0)).pow(2).mean()), rel=1e-5)  # fmt: skip
    # CORAL of a scaled copy: ||(s^2 - 1) C||_F^2 / (4 d^2)
    c = torch.cov(x.T)
    assert float(coral(2 * x, x)) == pytest.approx(float((3 * c).pow(2).sum() / 36), rel=1e-4)


@pytest.mark.parametrize("method", ["coral", "moments"])
def test_alignment_moves_few_shot_features_only(method):
    torch.manual_seed(0)
    features = torch.randn(12, 5, requires_grad=True)
    group = (0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3)  # group 3 has one sample: nothing to align
    term = FeatureAlignment(AlignmentOptions(method=method))
    loss = term(outputs(features=features * torch.tensor([1.0] * 4 + [3.0] * 8)[:, None], group=group), {})
    loss.backward()
    assert float(loss.detach()) > 0
    assert not features.grad[:4].any() and not features.grad[11].any()  # anchor detached, lone sample out
    assert features.grad[4:11].abs().sum() > 0
    # identical distributions per group: zero
    same = torch.cat([features.detach()[:4]] * 3)
    assert float(term(outputs(features=same, group=(0,) * 4 + (1,) * 4 + (2,) * 4), {})) == pytest.approx(
        0.0, abs=1e-6
    )
    with pytest.warns(UserWarning, match="fewer than 2 anchor samples, so the term adds nothing"):
        assert float(term(outputs(features=torch.randn(3, 5), group=(0, 1, 1)), {})) == 0.0  # one anchor
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert float(term(outputs(features=torch.randn(3, 5), group=(1, 1, 2)), {})) == 0.0


def test_classify_task_outputs_logits_features_and_anchor_mask():
    options = TimmOptions(
        model="resnet10t", num_classes=10, kwargs={"channels": [8, 16, 32, 64], "stem_width": 8}
    )
    context = TaskContext(("g1", "anchor", "g2"), "anchor", lambda: TimmBackbone(options))
    task = ClassifyTask(ClassifyOptions(), context)
    model = ba.branch(task.build()["model"], context.groups, low=1, top=0)
    batch = {
        "train": {
            "image": torch.randn(6, 3, 32, 32),
            "label": torch.arange(6),
            "group": torch.tensor([0, 1, 2, 1, 0, 2]),
        }
    }
    out = task.forward("main", {"model": model}, batch, {})
    assert out["logits"].shape == (6, 10) and out["features"].shape == (6, 64)
    assert out["anchor"].tolist() == [False, True, False, True, False, False]
    assert torch.equal(out["target"], torch.arange(6))
    with pytest.raises(ba.UserError, match=r"task\.features"):
        ClassifyTask(ClassifyOptions(), TaskContext(("a",), "a", lambda: ba.build_backbone("mlp"))).build()

"""Evaluation metrics on pairs whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from branchadapt_cartoon.evaluation import image_metrics


def test_identical_images_are_perfect():
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    m = image_metrics(x, x.clone())
    assert torch.all(m["l1"] == 0)
    assert torch.all(m["ssim"] > 0.9999)
    assert torch.all(torch.isinf(m["psnr"]) | (m["psnr"] > 80))


def test_constant_offset_gives_the_textbook_psnr_and_l1():
    x = torch.zeros(2, 3, 16, 16)  # 0.5 grey in [0, 1]
    y = x + 0.2  # +0.1 in [0, 1] units
    m = image_metrics(y, x)
    assert m["l1"] == pytest.approx(torch.full((2,), 0.1), abs=1e-6)
    assert m["psnr"] == pytest.approx(torch.full((2,), 10 * math.log10(1 / 0.01)), abs=1e-3)


def test_shifted_images_score_worse_than_identical_and_better_than_noise():
    torch.manual_seed(0)
    base = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 40, 40), 5, 1, 2) * 2 - 1
    img = base[..., 4:36, 4:36]
    shifted = base[..., 6:38, 4:36]  # the same content two pixels down
    noise = torch.rand_like(img) * 2 - 1
    same, moved, rand = image_metrics(img, img), image_metrics(shifted, img), image_metrics(noise, img)
    assert same["ssim"] > moved["ssim"] > rand["ssim"]
    assert same["l1"] < moved["l1"] < rand["l1"]
    assert moved["psnr"] > rand["psnr"]

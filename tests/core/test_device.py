"""Device selection errors and the per-device backend defaults."""

from __future__ import annotations

import pytest
import torch

from branchadapt import UserError
from branchadapt.device import autocast, autocast_dtype, configure_backend, select_device


@pytest.fixture
def restore_backend():
    saved = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    yield
    torch.backends.cudnn.benchmark = saved[0]
    torch.set_float32_matmul_precision(saved[1])


def test_cpu_keeps_the_measured_defaults(restore_backend):
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision("highest")
    configure_backend(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    assert torch.get_float32_matmul_precision() == "highest"


def test_cuda_turns_on_autotuning_and_tf32_matmuls(restore_backend):
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision("highest")
    configure_backend(torch.device("cuda", 0))  # flags only: no CUDA needed to set them
    assert torch.backends.cudnn.benchmark is True
    assert torch.get_float32_matmul_precision() == "high"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_cuda_is_a_user_error():
    with pytest.raises(UserError, match="CUDA is not available"):
        select_device("cuda")
    assert select_device("auto").type in {"cpu", "mps"}


def test_autocast_dtype_follows_the_autocast_context():
    t = torch.zeros(2)
    assert autocast_dtype(t) is None
    with autocast(torch.device("cpu"), "bf16"):
        assert autocast_dtype(t) is torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert autocast_dtype(t) is None

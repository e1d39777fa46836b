"""The pieces of the official recipe that are plain functions: the LR schedule, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from components.training import lr_factor


@pytest.mark.parametrize(("warmup", "total"), [(100, 20000), (10, 50), (0, 7), (1, 1)])
def test_linear_schedule_is_transformers_get_linear_schedule_with_warmup(warmup, total):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_linear_schedule_with_warmup(optimizer, warmup, total)
    for step in range(total + 3):  # past the end too: the stop step may exceed nothing, but must not go negative
        assert lr_factor(step, warmup, total, "linear") == pytest.approx(reference.get_last_lr()[0], abs=1e-12), step
        optimizer.step()
        reference.step()


def test_linear_schedule_at_the_official_stop_step():
    # The paper stops at step 5,000 of a 20,000-step schedule with 100 warmup steps: 0.75x the peak LR, where our
    # earlier cosine was at 0.86x.
    assert lr_factor(5000, 100, 20000, "linear") == pytest.approx(15000 / 19900)
    assert lr_factor(5000, 100, 20000, "cosine") == pytest.approx(0.8577, abs=1e-4)
    assert lr_factor(0, 100, 20000, "linear") == 0.0 and lr_factor(0, 100, 20000, "cosine") == pytest.approx(0.01)


def test_constant_schedule_warms_up_then_holds():
    assert [lr_factor(step, 4, 100, "constant") for step in (0, 3, 4, 99, 500)] == [0.25, 1.0, 1.0, 1.0, 1.0]


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="training.schedule"):
        lr_factor(5, 1, 10, "step")

"""Temperature module and schedules."""

from __future__ import annotations

import math

import pytest
import torch

from muco.losses import Temperature, TemperatureSchedule


def test_fixed_default():
    temp = Temperature()
    assert temp.value == pytest.approx(0.02)
    assert temp().dtype == torch.float32
    assert list(temp.parameters()) == []
    assert temp.state_dict() == {}  # non-persistent: checkpoints never pin a fixed/scheduled τ
    temp.set_step(1000)  # no schedule: no-op
    assert temp.value == pytest.approx(0.02)


def test_learnable_is_log_parameterised():
    temp = Temperature(0.05, learnable=True)
    (p,) = list(temp.parameters())
    assert p.item() == pytest.approx(math.log(0.05))
    temp().backward()
    assert p.grad.item() == pytest.approx(0.05)  # dτ/dlogτ = τ
    assert "log_tau" in temp.state_dict()


def test_learnable_clamp():
    temp = Temperature(0.001, learnable=True, min_tau=0.01)
    assert temp.value == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("mode", "mid"),
    [("constant", 0.1), ("linear", 0.055), ("cosine", 0.055)],
)
def test_schedule_values(mode, mid):
    s = TemperatureSchedule(mode, tau_start=0.1, tau_end=0.01, total_steps=100)
    assert s(0) == pytest.approx(0.1)
    assert s(50) == pytest.approx(mid)
    end = 0.1 if mode == "constant" else 0.01
    assert s(100) == pytest.approx(end)
    assert s(10_000) == pytest.approx(end)  # held after total_steps
    assert s(-5) == pytest.approx(0.1)


def test_cosine_is_slow_at_the_ends():
    s = TemperatureSchedule("cosine", tau_start=1.0, tau_end=0.0 + 1e-9, total_steps=100)
    lin = TemperatureSchedule("linear", tau_start=1.0, tau_end=1e-9, total_steps=100)
    assert s(10) > lin(10) and s(90) < lin(90)


def test_scheduled_module_follows_set_step():
    temp = Temperature(schedule=TemperatureSchedule("linear", 0.05, 0.02, total_steps=10))
    assert temp.value == pytest.approx(0.05)
    temp.set_step(5)
    assert temp.value == pytest.approx(0.035)
    assert temp().item() == pytest.approx(0.035)


def test_invalid_configs():
    with pytest.raises(ValueError):
        TemperatureSchedule("exp")
    with pytest.raises(ValueError):
        TemperatureSchedule("linear", tau_start=0.0)
    with pytest.raises(ValueError):
        Temperature(learnable=True, schedule=TemperatureSchedule())
    with pytest.raises(ValueError):
        Temperature(-1.0)

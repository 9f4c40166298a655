import math

import pytest
import torch

from muco.train.optim import OptimConfig, build_optimizer, lr_lambda, param_groups


def test_schedules_count_optimizer_steps():
    warm = lr_lambda("constant_with_warmup", warmup_steps=4, total_steps=100, min_lr_ratio=0.0)
    assert [warm(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    const = lr_lambda("constant", 0, 100, 0.0)
    assert const(0) == const(99) == 1.0
    cos = lr_lambda("cosine", warmup_steps=0, total_steps=10, min_lr_ratio=0.1)
    assert cos(0) == pytest.approx(1.0)
    assert cos(5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos(10) == pytest.approx(0.1)


def test_param_groups_skip_frozen_and_no_decay_for_norms():
    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    m[2].requires_grad_(False)
    groups = param_groups(m, 0.01)
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(m[0].weight), id(m[0].bias), id(m[1].weight), id(m[1].bias)}
    assert [id(p) for p in groups[0]["params"]] == [id(m[0].weight)]
    assert groups[1]["weight_decay"] == 0.0


def test_warmup_then_constant_through_the_scheduler():
    m = torch.nn.Linear(2, 2)
    out = build_optimizer(m, OptimConfig(lr=1e-3, schedule="constant_with_warmup", warmup_steps=2), 10)
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])
    assert out["lr_scheduler"]["interval"] == "step"


def test_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="linear-ish")

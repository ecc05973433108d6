"""Training precision, memory format and fp16 loss scaling (hierarchy.train.trainer), without timing anything."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import hierarchy.models.device as predict
from hierarchy.train import trainer as train


def tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def loss_of(model: torch.nn.Module) -> torch.Tensor:
    return model(torch.ones(3, 4)).square().mean()


def test_training_uses_bf16_autocast_on_a_capable_cpu_and_fp32_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(predict, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr("hierarchy.core.machine.has_amx", lambda: True)  # auto picks bf16 only with AMX
    assert predict.select_precision(cpu, "auto") == "bf16"
    monkeypatch.setattr(predict, "cpu_supports_bf16", lambda: False)
    assert predict.select_precision(cpu, "auto") == "fp32" and predict.select_precision(cpu, "bf16") == "fp32"
    assert train.memory_format(cpu, "bf16") == torch.channels_last == train.memory_format(cpu, "fp32")


def test_fp32_and_bf16_scalers_are_pass_through() -> None:
    cpu = torch.device("cpu")
    assert not train.grad_scaler(cpu, "fp32").is_enabled() and not train.grad_scaler(cpu, "bf16").is_enabled()
    model, opt = tiny()
    before = model.weight.detach().clone()
    ctx = SimpleNamespace(scaler=train.grad_scaler(cpu, "bf16"))
    assert train._step(ctx, model, opt, loss_of(model))
    assert not torch.equal(model.weight, before)


def test_fp16_overflow_step_lowers_the_scale_and_leaves_the_weights() -> None:
    model, opt = tiny()
    ctx = SimpleNamespace(scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=True))
    before = model.weight.detach().clone()
    hook = model.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    assert train._step(ctx, model, opt, loss_of(model))  # an overflow is not a bad step
    assert torch.equal(model.weight, before) and ctx.scaler.get_scale() == 2.0**15
    hook.remove()
    opt.zero_grad()
    assert train._step(ctx, model, opt, loss_of(model))
    assert not torch.equal(model.weight, before)


def test_fp16_overflow_after_overflow_is_reported_as_divergence() -> None:
    model, opt = tiny()
    ctx = SimpleNamespace(scaler=torch.amp.GradScaler("cpu", init_scale=2.0, enabled=True))
    model.weight.register_hook(lambda g: torch.full_like(g, math.nan))
    assert train._step(ctx, model, opt, loss_of(model))  # scale 2 -> 1
    opt.zero_grad()
    assert not train._step(ctx, model, opt, loss_of(model))  # scale 1 -> 0.5: counts as a bad step


def test_non_finite_loss_is_never_backpropagated() -> None:
    model, opt = tiny()
    before = model.weight.detach().clone()
    ctx = SimpleNamespace(scaler=train.grad_scaler(torch.device("cpu"), "fp32"))
    assert not train._step(ctx, model, opt, loss_of(model) * math.inf)
    assert model.weight.grad is None and torch.equal(model.weight, before)

"""Inference-time model preparation: fold BatchNorm into the preceding conv, pick the memory
format and the dtype that are fastest for the device and precision (measured, docs/performance.md).

On a 2-core AVX512-BF16/AMX CPU, ResNet18 at 224 px, batch 32 (CPU seconds, same process):
fp32 NCHW 2.32, fp32 channels_last 1.77, + BN folded 1.48; bf16 autocast channels_last 1.02,
bf16 weights channels_last 0.88, + BN folded 0.76, bf16 NCHW 1.89. So inference uses channels_last
in every precision and, on CPU, bf16 *weights* (no per-call autocast weight casts). Training is
different (bf16 conv backward is much slower in channels_last): see ``train.memory_format``.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class InferencePlan:
    """How a prepared model is called: input dtype and memory format, and whether to autocast."""

    input_dtype: torch.dtype
    memory_format: torch.memory_format
    autocast_dtype: torch.dtype | None


def plan_for(device: torch.device, precision: str) -> InferencePlan:
    """CPU bf16: cast weights and inputs (fastest). CUDA fp16/bf16: autocast (keeps reductions
    and softmax-like ops in fp32). fp32 anywhere: plain. channels_last everywhere."""
    dtype = _DTYPES.get(precision)
    if dtype is None:
        return InferencePlan(torch.float32, torch.channels_last, None)
    if device.type == "cpu" and dtype == torch.bfloat16:
        return InferencePlan(torch.bfloat16, torch.channels_last, None)
    return InferencePlan(torch.float32, torch.channels_last, dtype)


def prepare_model(model: nn.Module, device: torch.device, plan: InferencePlan, copy_model: bool = True) -> nn.Module:
    """``model`` in eval mode on ``device``, BatchNorm folded, in the plan's dtype and memory
    format. With ``copy_model`` (default) the caller's module is left untouched; without, it is
    changed in place (saves a deepcopy when the caller built the model just for this)."""
    model = (copy.deepcopy(model) if copy_model else model).eval()
    fold_batchnorm(model)
    model = model.to(device)
    if plan.input_dtype != torch.float32:
        model = model.to(plan.input_dtype)
    return model.to(memory_format=plan.memory_format)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that directly (and only) follows a ``Conv2d`` into that
    conv, in place, replacing the BN with ``Identity``; returns how many were folded. The graph
    comes from ``torch.fx``; a model fx cannot trace is left as it is."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from hierarchy.models.resnet import batchnorm_pairs

    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model")
    pairs = batchnorm_pairs(model)  # hierarchy's own ResNet: known statically, no trace
    if pairs is None:
        pairs = _traced_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        model.set_submodule(conv_name, fuse_conv_bn_eval(conv, bn))
        model.set_submodule(bn_name, nn.Identity())
    return len(pairs)


def _traced_pairs(model: nn.Module) -> list[tuple[str, str]]:
    from torch.fx import symbolic_trace

    try:
        graph = symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - fx raises many types on dynamic control flow
        log.debug("not folding BatchNorm: %s cannot be traced (%s)", type(model).__name__, exc)
        return []
    return _conv_bn_pairs(graph, dict(model.named_modules()))


def _conv_bn_pairs(graph: "torch.fx.Graph", modules: dict[str, nn.Module]) -> list[tuple[str, str]]:
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv, bn = modules.get(src.target), modules[node.target]
        if isinstance(conv, nn.Conv2d) and calls[src.target] == 1 and calls[node.target] == 1 and \
                bn.track_running_stats and bn.running_mean is not None:
            pairs.append((str(src.target), str(node.target)))
    return pairs

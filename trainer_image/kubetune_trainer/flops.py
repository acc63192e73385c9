"""Model FLOPs per token and model FLOPs utilization (MFU).

MFU = achieved model FLOP/s per accelerator ÷ the accelerator's dense bf16
peak.  "Model" FLOPs count the matmuls the training algorithm needs, not
what the kernels happen to do (no recomputation from gradient checkpointing,
no padding), with the usual ``6·N`` convention per token for full
fine-tuning — 2N forward, 2N backward to the activations, 2N for the weight
gradients — and attention's sequence-length term left out, as the HF
Trainer comparisons this project reports do.

Parameter-efficient strategies do less: the backward pass reaches only the
layers at and above the lowest trainable parameter, and weight gradients
exist only for trainable parameters::

    flops/token = 2·N + 2·N_backward + 2·N_trainable

so LoRA is about ``4·N`` and ``partial`` with the top layers trainable less
still.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# Dense bf16 tensor-core peaks per device in TFLOP/s (vendor datasheets, no sparsity).  Matched
# as substrings of the device name, longest first ("L40S" before "L40" before "L4").
PEAK_BF16_TFLOPS: dict[str, float] = {
    "GB200": 2500.0,
    "B200": 2250.0,
    "B100": 1750.0,
    "GH200": 989.0,
    "H200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM ("NVIDIA H100 80GB HBM3")
    "H800": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "MI300X": 1307.0,
    "MI250X": 383.0,
}
# Parameters of prompt and prefix tuning sit outside the layer stack but feed every layer.
INPUT_SIDE_MARKERS = ("prompt_encoder", "prefix_encoder", "prompt_embeddings")


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The device's dense bf16 peak: ``override`` when given, else from the table; None when unknown."""
    if override is not None:
        return override
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def flops_per_token(named_parameters: Iterable[tuple[str, Any]]) -> float:
    """Training FLOPs per token of a model with these parameters (registration order, as the model has them).

    Tied parameters count once.  The backward pass is counted from the first
    trainable parameter in registration order (embeddings, then the layers,
    then the head), or through the whole model when a prompt/prefix encoder
    is trained.
    """
    seen: set[int] = set()
    sizes: list[tuple[int, bool]] = []  # (elements, trainable) in order
    input_side = False
    for name, param in named_parameters:
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = int(getattr(param, "ds_numel", 0) or param.numel())
        trainable = bool(param.requires_grad)
        sizes.append((n, trainable))
        input_side = input_side or (trainable and any(m in name for m in INPUT_SIDE_MARKERS))
    total = sum(n for n, _ in sizes)
    trainable_total = sum(n for n, t in sizes if t)
    if trainable_total == 0:
        return 2.0 * total
    if input_side:
        backward = total
    else:
        first = next(i for i, (_, t) in enumerate(sizes) if t)
        backward = sum(n for n, _ in sizes[first:])
    return 2.0 * total + 2.0 * backward + 2.0 * trainable_total


def utilization(tokens_per_second_per_device: float, per_token: float, peak: float | None) -> float | None:
    """MFU in [0, 1+] (None without a known peak)."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_second_per_device * per_token / (peak * 1e12)

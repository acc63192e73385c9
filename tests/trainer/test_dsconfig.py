"""The generated DeepSpeed config: golden files, DeepSpeed's own validation, real engines.

Regenerate the golden files with ``KUBETUNE_UPDATE_GOLDEN=1`` after an
intended change, and review the diff.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.dsconfig import build_deepspeed_config, deep_merge, effective_precision, warmup_steps
from kubetune_trainer.spec import FineTuneJobSpec

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[2]
UPDATE = os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1"
GPU = {"requests": {"nvidia.com/gpu": "2"}}


def _spec(**sections: Any) -> FineTuneJobSpec:
    base: dict[str, Any] = {
        "model": {"source": "file:///models/bert", "task": "sequence-classification", "labels": ["neg", "pos"]},
        "dataset": {"train": "file:///data/train.jsonl"},
        "strategy": {"type": "full"},
        "objective": {"regularization": {"weightDecay": 0.01}},
        "training": {"epochs": 1, "learningRate": 3e-5, "warmupRatio": 0.06, "microBatchSize": 8},
    }
    return FineTuneJobSpec.model_validate(deep_merge(base, sections))


# name -> (spec sections, world size, cpu, total steps)
VARIANTS: dict[str, tuple[dict[str, Any], int, bool, int]] = {
    "stage0-gpu-bf16": ({"deepspeed": {"zeroStage": 0}, "resources": GPU}, 2, False, 100),
    "stage1-gpu-bf16": ({"deepspeed": {"zeroStage": 1}, "resources": GPU}, 2, False, 100),
    "stage2-gpu-bf16": ({"deepspeed": {"zeroStage": 2}, "resources": GPU}, 2, False, 100),
    "stage3-gpu-bf16": ({"deepspeed": {"zeroStage": 3}, "resources": GPU}, 2, False, 100),
    "stage2-offload-optimizer-gpu": (
        {"deepspeed": {"zeroStage": 2, "offloadOptimizer": "cpu"}, "resources": GPU},
        2,
        False,
        100,
    ),
    "stage3-offload-optimizer-params-gpu": (
        {"deepspeed": {"zeroStage": 3, "offloadOptimizer": "cpu", "offloadParams": "cpu"}, "resources": GPU},
        2,
        False,
        100,
    ),
    "stage3-offload-optimizer-params-cpu": (
        {"deepspeed": {"zeroStage": 3, "offloadOptimizer": "cpu", "offloadParams": "cpu"}},
        2,
        True,
        100,
    ),
    "precision-fp16-gpu": ({"training": {"precision": "fp16"}, "resources": GPU}, 4, False, 100),
    "precision-fp32-gpu": ({"training": {"precision": "fp32"}, "resources": GPU}, 2, False, 100),
    "precision-bf16-on-cpu-forced-fp32": ({"training": {"precision": "bf16"}}, 2, True, 100),
    "stage2-cpu-accumulation-clipping-off": (
        {"training": {"gradientAccumulationSteps": 4, "maxGradNorm": 0.0}},
        2,
        True,
        50,
    ),
    "scheduler-cosine": ({"training": {"scheduler": "cosine"}}, 2, True, 200),
    "scheduler-constant-warmup": ({"training": {"scheduler": "constant", "warmupRatio": 0.1}}, 2, True, 200),
    "scheduler-constant-no-warmup": ({"training": {"scheduler": "constant", "warmupRatio": 0.0}}, 2, True, 200),
    "scheduler-cosine-no-warmup": ({"training": {"scheduler": "cosine", "warmupRatio": 0.0}}, 2, True, 200),
    "scheduler-linear-no-warmup": ({"training": {"warmupRatio": 0.0}}, 2, True, 200),
    "user-merge": (
        {
            "deepspeed": {
                "zeroStage": 2,
                "config": {
                    "zero_optimization": {"reduce_bucket_size": 1000000, "round_robin_gradients": True},
                    "optimizer": {"params": {"betas": [0.9, 0.95]}},
                    "gradient_accumulation_steps": 2,
                    "communication_data_type": "fp32",
                },
            },
            "resources": GPU,
        },
        2,
        False,
        100,
    ),
    "user-replaces-scheduler-type": (
        {"deepspeed": {"config": {"scheduler": {"type": "OneCycle", "params": {"cycle_max_lr": 0.001}}}}},
        2,
        True,
        100,
    ),
    "user-sets-train-batch-size": ({"deepspeed": {"config": {"train_batch_size": 64}}}, 2, True, 100),
}


def _build(name: str) -> dict[str, Any]:
    sections, world, cpu, total = VARIANTS[name]
    return build_deepspeed_config(_spec(**sections), world_size=world, cpu=cpu, total_steps=total)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_golden(name: str) -> None:
    generated = _build(name)
    path = GOLDEN / f"deepspeed-{name}.json"
    text = json.dumps(generated, indent=2, sort_keys=True) + "\n"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"missing golden file {path}; run with KUBETUNE_UPDATE_GOLDEN=1"
    assert json.loads(path.read_text()) == generated, f"{path} differs; KUBETUNE_UPDATE_GOLDEN=1 regenerates it"


def test_no_stale_golden_files() -> None:
    expected = {f"deepspeed-{name}.json" for name in VARIANTS}
    assert {p.name for p in GOLDEN.glob("deepspeed-*.json")} == expected


def test_pure_same_input_same_output_and_spec_untouched() -> None:
    spec = _spec(deepspeed={"config": {"zero_optimization": {"stage": 1}}})
    before = spec.model_dump()
    a = build_deepspeed_config(spec, world_size=2, cpu=True, total_steps=10)
    a["zero_optimization"]["stage"] = 99  # mutating the result must not leak into the spec
    b = build_deepspeed_config(spec, world_size=2, cpu=True, total_steps=10)
    assert b["zero_optimization"]["stage"] == 1
    assert spec.model_dump() == before


def test_batch_triple_and_core_mapping() -> None:
    config = _build("stage2-cpu-accumulation-clipping-off")
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 8 * 4 * 2
    assert config["gradient_clipping"] == 0.0
    params = config["optimizer"]["params"]
    assert config["optimizer"]["type"] == "AdamW"
    assert params["lr"] == 3e-5
    assert params["weight_decay"] == 0.01
    assert params["torch_adam"] is True  # torch's AdamW instead of DeepSpeed's compiled FusedAdam
    assert params["fused"] is True  # ... with its fused kernel
    assert config["steps_per_print"] >= 10**9
    assert config["wall_clock_breakdown"] is False


def test_cpu_forces_fp32_and_says_so() -> None:
    spec = _spec(training={"precision": "bf16"})
    config = build_deepspeed_config(spec, world_size=1, cpu=True, total_steps=10)
    assert config["bf16"] == {"enabled": False}
    assert config["fp16"] == {"enabled": False}
    precision, note = effective_precision(spec, cpu=True)
    assert precision == "fp32"
    assert note is not None
    assert "training.precision" in note
    assert effective_precision(spec, cpu=False) == ("bf16", None)


def test_cpu_bf16_keeps_a_requested_bf16_with_the_cpu_settings() -> None:
    bf16 = _spec(training={"precision": "bf16"})
    config = build_deepspeed_config(bf16, world_size=1, cpu=True, total_steps=10, cpu_bf16=True)
    assert (config["bf16"], config["fp16"]) == ({"enabled": True}, {"enabled": False})
    assert config["zero_optimization"]["overlap_comm"] is False  # still the CPU's settings otherwise
    assert effective_precision(bf16, cpu=True, cpu_bf16=True) == ("bf16", None)


def test_gpu_precision_blocks() -> None:
    gpu = _build("stage2-gpu-bf16")
    assert gpu["bf16"] == {"enabled": True}
    # GPUs too: torch's fused CUDA AdamW (the HF Trainer's adamw_torch_fused), no op to compile at start-up.
    assert gpu["optimizer"]["params"]["torch_adam"] is True
    assert gpu["optimizer"]["params"]["fused"] is True
    fp16 = _build("precision-fp16-gpu")
    assert fp16["fp16"]["enabled"] is True
    assert fp16["fp16"]["loss_scale"] == 0  # dynamic
    assert fp16["bf16"] == {"enabled": False}


def test_zero_sections() -> None:
    s3 = _build("stage3-offload-optimizer-params-gpu")["zero_optimization"]
    assert s3["stage"] == 3
    assert s3["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert s3["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert s3["stage3_gather_16bit_weights_on_model_save"] is True
    cpu = _build("stage3-offload-optimizer-params-cpu")
    assert cpu["zero_optimization"]["offload_optimizer"]["pin_memory"] is False
    assert "torch_adam" not in cpu["optimizer"]["params"]  # ZeRO-Offload needs DeepSpeedCPUAdam
    s0 = _build("stage0-gpu-bf16")["zero_optimization"]
    assert s0["stage"] == 0
    assert "offload_optimizer" not in s0
    assert "stage3_gather_16bit_weights_on_model_save" not in s0


def test_user_config_merged_last() -> None:
    config = _build("user-merge")
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1000000
    assert zero["round_robin_gradients"] is True
    assert zero["stage"] == 2  # kept from the spec
    assert config["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert config["optimizer"]["params"]["lr"] == 3e-5
    assert config["communication_data_type"] == "fp32"
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 8 * 2 * 2
    replaced = _build("user-replaces-scheduler-type")["scheduler"]
    assert replaced == {"type": "OneCycle", "params": {"cycle_max_lr": 0.001}}
    tb = _build("user-sets-train-batch-size")
    assert (tb["train_batch_size"], tb["train_micro_batch_size_per_gpu"], tb["gradient_accumulation_steps"]) == (
        64,
        8,
        4,
    )


def test_inconsistent_user_batch_names_the_field() -> None:
    spec = _spec(deepspeed={"config": {"train_batch_size": 30}})
    with pytest.raises(ValueError, match=r"spec\.deepspeed\.config\.train_batch_size"):
        build_deepspeed_config(spec, world_size=4, cpu=True, total_steps=10)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="world_size"):
        build_deepspeed_config(_spec(), world_size=0, cpu=True, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        build_deepspeed_config(_spec(), world_size=1, cpu=True, total_steps=0)


def test_warmup_steps_rounds_up() -> None:
    assert warmup_steps(_spec(training={"warmupRatio": 0.06}), 533) == math.ceil(0.06 * 533)
    assert warmup_steps(_spec(training={"warmupRatio": 0.0}), 533) == 0


# --------------------------------------------------------------------------- the schedules DeepSpeed will run


def _lrs(config: dict[str, Any], steps: int) -> list[float]:
    import torch
    from deepspeed.runtime import lr_schedules

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config["optimizer"]["params"]["lr"])
    scheduler = getattr(lr_schedules, config["scheduler"]["type"])(optimizer, **config["scheduler"]["params"])
    # The engine calls scheduler.step() after each optimizer step; the lr of
    # step k is what the optimizer holds when step k runs.
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    return lrs


def test_linear_schedule_is_warmup_then_linear_decay_one_step_behind() -> None:
    total, lr, warm = 200, 3e-5, 10
    config = build_deepspeed_config(_spec(training={"warmupRatio": 0.05}), world_size=1, cpu=True, total_steps=total)
    assert config["scheduler"]["params"]["warmup_num_steps"] == warm

    def f(k: int) -> float:  # Hugging Face's get_linear_schedule_with_warmup at step k
        return lr * k / warm if k < warm else lr * max(0.0, (total - k) / (total - warm))

    # DeepSpeed runs step k at f(k - 1), starting from 0.
    expected = [0.0] + [f(k - 1) for k in range(1, total)]
    assert _lrs(config, total) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_cosine_and_constant_warmup_schedules() -> None:
    lr = 3e-5
    cosine = _lrs(_build("scheduler-cosine"), 200)  # warm-up ceil(0.06·200) = 12
    assert cosine[0] == 0.0
    assert cosine[6] == pytest.approx(lr * 5 / 12)
    assert max(cosine) == pytest.approx(lr, rel=1e-3)  # DeepSpeed starts the decay one notch below the peak
    assert cosine[-1] < 0.01 * lr
    constant = _lrs(_build("scheduler-constant-warmup"), 200)  # warm-up 20
    assert constant[11] == pytest.approx(lr * 10 / 20)
    assert constant[21:] == pytest.approx([lr] * 179)


def test_no_warmup_schedules_start_at_peak() -> None:
    lr = 3e-5
    assert _lrs(_build("scheduler-constant-no-warmup"), 5) == pytest.approx([lr] * 5)
    cosine = _lrs(_build("scheduler-cosine-no-warmup"), 200)
    assert cosine[:2] == pytest.approx([lr] * 2)
    assert cosine[100] == pytest.approx(lr * (1 + math.cos(math.pi * 99 / 198)) / 2)
    assert cosine[-1] < 0.001 * lr
    linear = _lrs(_build("scheduler-linear-no-warmup"), 200)
    # Like Hugging Face's linear schedule without warm-up, from the peak down,
    # except that DeepSpeed's minimum 2-step warm-up stays flat at the peak.
    assert linear[:3] == pytest.approx([lr] * 3)
    assert linear[100] == pytest.approx(lr * (200 - 100) / (200 - 2))
    assert linear[-1] == pytest.approx(lr / 198)


# --------------------------------------------------------------------------- DeepSpeed accepts every config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_VALIDATE = r"""
import json, sys
import deepspeed
from deepspeed.runtime.config import DeepSpeedConfig
from kubetune_trainer.nativeops import SHARED_MEMORY_COMM, load_native_ops

load_native_ops([SHARED_MEMORY_COMM], print)  # as the trainer does: a killed run's build lock never hangs this
deepspeed.init_distributed(dist_backend="gloo")


class DataParallel:  # DeepSpeed's mpu interface: the data-parallel world size the config was built for
    def __init__(self, n):
        self.n = n

    def get_data_parallel_world_size(self):
        return self.n


results = {}
for name, (config, world) in json.load(sys.stdin).items():
    parsed = DeepSpeedConfig(config, mpu=DataParallel(world))
    results[name] = {
        "train_batch_size": parsed.train_batch_size,
        "micro": parsed.train_micro_batch_size_per_gpu,
        "accumulation": parsed.gradient_accumulation_steps,
        "stage": int(parsed.zero_optimization_stage),
        "offload_optimizer": str(getattr(parsed.zero_config.offload_optimizer, "device", None)),
        "offload_param": str(getattr(parsed.zero_config.offload_param, "device", None)),
        "bf16": parsed.bfloat16_config.enabled,
        "fp16": parsed.float16_config.enabled,
        "clipping": parsed.gradient_clipping,
        "optimizer": parsed.optimizer_name,
        "scheduler": parsed.scheduler_name,
    }
print("RESULT " + json.dumps(results))
"""


def _env(world: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "PYTHONPATH": os.pathsep.join([str(REPO / "trainer_image"), str(REPO / "operator")]),
            "OMP_NUM_THREADS": "1",
        }
    )
    return env


def test_deepspeed_config_accepts_every_variant() -> None:
    payload = {name: (_build(name), VARIANTS[name][1]) for name in VARIANTS}
    proc = subprocess.run(
        [sys.executable, "-c", _VALIDATE],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines, proc.stdout[-3000:]
    results = json.loads(lines[-1].removeprefix("RESULT "))
    for name, parsed in results.items():
        config = payload[name][0]
        assert parsed["train_batch_size"] == config["train_batch_size"], name
        assert parsed["micro"] == config["train_micro_batch_size_per_gpu"], name
        assert parsed["accumulation"] == config["gradient_accumulation_steps"], name
        assert parsed["stage"] == config["zero_optimization"]["stage"], name
        assert parsed["bf16"] == config["bf16"]["enabled"], name
        assert parsed["fp16"] == config["fp16"]["enabled"], name
        assert parsed["clipping"] == config["gradient_clipping"], name
        assert parsed["optimizer"] == config["optimizer"]["type"].lower(), name
        assert parsed["scheduler"] == config["scheduler"]["type"], name
    assert results["stage3-offload-optimizer-params-gpu"]["offload_param"].endswith("cpu")
    assert results["stage2-offload-optimizer-gpu"]["offload_optimizer"].endswith("cpu")


_TRAIN = r"""
import json, sys
import torch
import deepspeed
from kubetune_trainer.dsconfig import build_deepspeed_config
from kubetune_trainer.objective import param_groups
from kubetune_trainer.nativeops import CPU_ADAM, SHARED_MEMORY_COMM, load_native_ops
from kubetune_trainer.spec import FineTuneJobSpec

load_native_ops([SHARED_MEMORY_COMM, CPU_ADAM], print)  # as the trainer does (stage3-offload loads CPU Adam)
deepspeed.init_distributed(dist_backend="gloo")
out = {}
for name, spec_json in json.load(sys.stdin).items():
    spec = FineTuneJobSpec.model_validate(spec_json)
    config = build_deepspeed_config(spec, world_size=1, cpu=True, total_steps=30)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, 0.01), config=config
    )
    x = torch.randn(32, 6)
    y = (x[:, 0] > 0).long()
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    out[name] = {
        "optimizer": type(engine.optimizer).__name__,
        "fused": bool(getattr(getattr(engine.optimizer, "optimizer", engine.optimizer), "defaults", {}).get("fused")),
        "weight_decay": sorted(g["weight_decay"] for g in optimizer.param_groups),
        "first": losses[0],
        "last": losses[-1],
    }
print("RESULT " + json.dumps(out))
"""


def test_real_engines_train_with_generated_configs() -> None:
    """deepspeed.initialize + steps on CPU with the generated config: stages 0-3 and ZeRO-Offload."""
    lr = {"learningRate": 0.01, "warmupRatio": 0.1}
    specs = {
        "stage0": _spec(deepspeed={"zeroStage": 0}, training=lr),
        "stage1": _spec(deepspeed={"zeroStage": 1}, training=lr),
        "stage2": _spec(deepspeed={"zeroStage": 2}, training=lr),
        "stage3": _spec(deepspeed={"zeroStage": 3}, training=lr),
        "stage3-offload": _spec(
            deepspeed={"zeroStage": 3, "offloadOptimizer": "cpu", "offloadParams": "cpu"}, training=lr
        ),
    }
    payload = {name: spec.model_dump(mode="json", by_alias=True, exclude_none=True) for name, spec in specs.items()}
    proc = subprocess.run(
        [sys.executable, "-c", _TRAIN],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines, proc.stdout[-3000:]
    results = json.loads(lines[-1].removeprefix("RESULT "))
    for name, r in results.items():
        assert r["last"] < 0.7 * r["first"], (name, r)
        # Two groups reached the optimizer: decayed weights and exempt biases/norms.
        assert r["weight_decay"] == [0.0, 0.01], (name, r)
    assert results["stage0"]["optimizer"] == "AdamW"
    assert results["stage0"]["fused"] is True
    assert results["stage2"]["fused"] is True  # the torch optimizer inside ZeRO's wrapper
    assert results["stage3-offload"]["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"

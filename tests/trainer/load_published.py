"""Load published kubetune outputs with plain transformers/peft and recompute evaluation logits.

Run in a fresh interpreter (``python -I``) by the strategy matrix test.  kubetune
is made unimportable first, so a published model that needed our code to load
would fail here.  Input (argv[1]): JSON list of
``{"name", "output", "base", "task", "num_labels", "sample"}``; prints one JSON
object ``{name: {"max_abs_diff": float, "published_as": str} | {"error": str}}``.

Logits are recomputed in fp32 arithmetic.  For a run that trained in bf16 the
result also has ``bf16_noise``: how far the same published model's logits move
when it computes in bf16 instead (max abs; weights published in bf16 stay what
they are).  The trainer's logits came from bf16 arithmetic, so they may sit that
far from the fp32 ones: near a steep point of the model (a sample between two
saturated classes) bf16 rounding alone moves a logit by several percent.
"""

import json
import sys
from pathlib import Path

for blocked in ("kubetune_trainer", "kubetune_operator"):
    sys.modules[blocked] = None  # type: ignore[assignment]  # any import of kubetune now fails

import torch  # noqa: E402 (kubetune is blocked before anything is imported)
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

AUTO = {
    "sequence-classification": transformers.AutoModelForSequenceClassification,
    "token-classification": transformers.AutoModelForTokenClassification,
    "causal-lm": transformers.AutoModelForCausalLM,
    "masked-lm": transformers.AutoModelForMaskedLM,
}


def load(entry, info):
    """The published model of ``entry`` (``info``: its run's ``kubetune-metrics.json``), and how it was published."""
    auto = AUTO[entry["task"]]
    if entry.get("merged"):  # mergeAdapter: full weights with the adapter folded in, under merged/
        return auto.from_pretrained(f"{entry['output']}/merged").eval(), "merged"
    kwargs = {"num_labels": entry["num_labels"]} if entry["num_labels"] else {}
    if info["publishedAs"] == "peft":
        from peft import PeftModel

        base = auto.from_pretrained(entry["base"], **kwargs)
        model = PeftModel.from_pretrained(base, entry["output"])
    elif info["publishedAs"] == "remote-code":  # bottleneck adapters: the modeling file ships with the weights
        model = auto.from_pretrained(entry["output"], trust_remote_code=True)
    else:
        model = auto.from_pretrained(entry["output"])
    return model.eval(), info["publishedAs"]


def main():
    results = {}
    for entry in json.loads(Path(sys.argv[1]).read_text()):
        try:
            info = json.loads(Path(entry["output"], "kubetune-metrics.json").read_text())
            model, kind = load(entry, info)
            model = model.float()  # a bf16 run publishes full weights in bf16; the reference arithmetic is fp32
            sample = load_file(entry["sample"])
            expected = sample.pop("logits")
            labels = sample.pop("kubetune_labels")
            with torch.no_grad():
                logits = model(**sample).logits.float()
            if logits.shape != expected.shape:
                raise ValueError(f"logits shape {tuple(logits.shape)} != trainer's {tuple(expected.shape)}")
            results[entry["name"]] = {"max_abs_diff": float((logits - expected).abs().max()), "published_as": kind}
            if entry["task"] == "masked-lm":
                # The same masked batch through the untouched pretrained model: the loss before training.
                base = AUTO["masked-lm"].from_pretrained(entry["base"]).eval()
                with torch.no_grad():
                    before = base(**sample).logits.float()
                ce = torch.nn.functional.cross_entropy
                results[entry["name"]]["loss_before"] = float(
                    ce(before.reshape(-1, before.shape[-1]), labels.reshape(-1))
                )
                results[entry["name"]]["loss_after"] = float(
                    ce(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
                )
            if info.get("precision") == "bf16":
                with torch.no_grad():
                    in_bf16 = model.to(torch.bfloat16)(**sample).logits.float()
                results[entry["name"]]["bf16_noise"] = float((in_bf16 - logits).abs().max())
        except Exception as error:  # reported per entry; the test names the failing one
            results[entry["name"]] = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps(results))


main()

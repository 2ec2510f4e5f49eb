"""The compatibility rules of `sft-dist plan` / `sft-dist train`: one test per rule, each showing the
setup that fires it (with its message and fix) and the corrected setup that passes."""

from __future__ import annotations

import json
import time

import pytest

from sft_dist.cli import main
from sft_dist.config.load import load_config
from sft_dist.plan.facts import gather_facts
from sft_dist.plan.rules import RULES, evaluate
from tests.conftest import DS, QUICKSTART, backend

ZERO2, ZERO3, FULL_SHARD = backend("zero2"), backend("zero3"), backend("full_shard")


def findings(*overrides, **facts):
    f = gather_facts(load_config(QUICKSTART, list(overrides)), classes=True)  # as the workers' and `plan`'s
    return {x.rule: x for x in evaluate(f.replace(**facts) if facts else f)}


def fires(rule: str, bad: list[str], good: list[str], *, severity: str = "error", bad_facts=None, good_facts=None):
    """`rule` fires for `bad` (and its text names the rule's keys and a fix), and not for `good`."""
    hit = findings(*bad, **(bad_facts or {}))
    assert rule in hit, f"{rule} did not fire for {bad}: {sorted(hit)}"
    finding = hit[rule]
    assert finding.severity == severity and finding.fix and finding.keys
    assert rule not in findings(*good, **(good_facts or {})), f"{rule} fired for the corrected setup {good}"
    return finding


def test_qlora_fsdp_needs_floating_quant_storage():
    f = fires("qlora-fsdp-quant-storage", ["quantization.bits=4", "quantization.quant_storage=uint8", *FULL_SHARD],
              ["quantization.bits=4", *FULL_SHARD])  # auto: the model's dtype under FSDP
    assert "cannot be sharded by FSDP2" in f.message and "quant_storage: float32" in f.fix


def test_int8_under_fsdp_is_refused():
    f = fires("int8-fsdp", ["quantization.bits=8", *FULL_SHARD], ["quantization.bits=8", *ZERO2])
    assert "'Parameter' object has no attribute 'CB'" in f.message and "quantization.bits: 4" in f.fix


def test_qlora_zero3_init_warns_that_each_rank_loads_the_whole_base():
    f = fires("qlora-zero3-init", ["quantization.bits=4", *ZERO3], ["quantization.bits=4", *ZERO2],
              severity="warning")
    assert "zero.Init" in f.message and "whole 4-bit base" in f.fix


@pytest.mark.parametrize("key", ["activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"])
def test_reentrant_checkpointing_with_lora_under_ddp_searching_unused_parameters(key):
    """Under transformers 5's name and its older alias, as the Trainer reads them."""
    ckpt = ["training.activation_checkpointing=true", f"training.{key}={{use_reentrant: true}}"]
    f = fires("reentrant-checkpointing-lora", [*ckpt, "training.ddp_find_unused_parameters=true"],
              [*ckpt])  # sft_dist's default find_unused_parameters=false: measured to train
    assert "Expected to mark a variable ready only once" in f.message and "use_reentrant: false" in f.fix
    assert "reentrant-checkpointing-lora" not in findings(*ckpt, "training.ddp_find_unused_parameters=true",
                                                          "launcher.num_workers=1")


def test_dora_on_an_8bit_base_is_refused():
    f = fires("dora-int8", ["quantization.bits=8", "lora.use_dora=true"], ["quantization.bits=4", "lora.use_dora=true"])
    assert "quantization.bits: 4" in f.fix


def test_dora_on_a_quantized_base_under_zero3_is_refused():
    f = fires("dora-quantized-zero3", ["quantization.bits=4", "lora.use_dora=true", *ZERO3],
              ["quantization.bits=4", "lora.use_dora=true", *FULL_SHARD])
    assert "ds_status" in f.message and "fsdp" in f.fix


def test_dora_on_a_4bit_base_warns_about_its_cost():
    fires("dora-quantized-cost", ["quantization.bits=4", "lora.use_dora=true"], ["quantization.bits=4"],
          severity="warning")


def test_fp16_on_cpu_is_refused():
    f = fires("activation-offloading-on-cpu", ["training.activation_offloading=true"],
              ["training.activation_checkpointing=true"])
    assert "there is no accelerator to move them from" in f.message
    f = fires("fp16-on-cpu", ["training.fp16=true"], ["training.bf16=true"])
    assert "bf16: true" in f.fix


def test_bf16_on_a_gpu_without_bf16():
    f = fires("bf16-without-hardware", ["training.bf16=true"], ["training.fp16=true"],
              bad_facts={"device": "cuda", "bf16_hardware": False},
              good_facts={"device": "cuda", "bf16_hardware": False})
    assert "fp16: true" in f.fix
    assert "bf16-without-hardware" not in findings("training.bf16=true", device="cuda", bf16_hardware=True)


def test_bitsandbytes_optimizer_on_a_device_without_its_kernels():
    f = fires("bnb-optimizer-device", ["training.optim=paged_adamw_8bit"], ["training.optim=adamw_torch"],
              bad_facts={"bnb_optimizer_kernels": False})
    assert "adamw_torch" in f.fix
    # the installed bitsandbytes has CPU kernels: on this machine paged_adamw_8bit passes (with a warning)
    assert "bnb-optimizer-device" not in findings("training.optim=paged_adamw_8bit")


def test_paged_optimizer_on_cpu_warns_that_nothing_is_paged():
    fires("paged-optimizer-on-cpu", ["training.optim=paged_adamw_8bit"], ["training.optim=adamw_bnb_8bit"],
          severity="warning")


def test_load_best_model_without_eval():
    f = fires("best-model-without-eval", ["training.load_best_model_at_end=true", "training.eval_strategy=no"],
              ["training.load_best_model_at_end=true", "training.save_strategy=steps", "training.save_steps=50"])
    assert "eval_strategy is 'no'" in f.message
    f = findings("training.load_best_model_at_end=true", "data.eval_files=null", "training.save_steps=50",
                 "training.save_strategy=steps")["best-model-without-eval"]
    assert "there is no eval data" in f.message


def test_generated_eval_rows_need_an_evaluation():
    f = fires("generated-eval-without-eval", ["metrics.generate_eval_rows=8", "training.eval_strategy=no"],
              ["metrics.generate_eval_rows=8"])
    assert "metrics.generate_eval_rows=8 answers eval rows at each evaluation" in f.message
    assert "eval_strategy is 'no'" in f.message


def test_an_evaluation_needs_eval_data_and_no_eval_strategy():
    f = fires("evaluate-without-eval-data", ["training.do_train=false", "data.eval_files=null"],
              ["training.do_train=false"])
    assert f.message.startswith("training.do_train=false evaluates the model on the eval data")
    assert "data.eval_files=test.jsonl" in f.fix
    # evaluating once needs no eval_strategy: the answers' scores are not refused for the lack of one
    assert "generated-eval-without-eval" not in findings("training.do_train=false", "training.eval_strategy=no",
                                                         "metrics.generate_eval_rows=4")
    assert "evaluate-without-eval-data" not in findings("data.eval_files=null")  # training: no eval needed


def test_a_best_metric_the_evaluation_does_not_report_is_refused():
    f = fires("best-metric-unknown", ["training.metric_for_best_model=eval_bleu"],
              ["training.metric_for_best_model=eval_perplexity"])
    assert f.message.startswith("'eval_bleu' is not a metric this run's evaluation reports")
    assert f.fix == ("name one of loss, perplexity, mean_token_accuracy (exact_match, token_f1 and rouge_l need "
                     "metrics.generate_eval_rows > 0)")
    # the text metrics exist where the eval rows are answered
    assert "best-metric-unknown" in findings("training.metric_for_best_model=rouge_l")
    assert "best-metric-unknown" not in findings("training.metric_for_best_model=rouge_l",
                                                 "metrics.generate_eval_rows=4")


def test_greater_is_better_against_the_metric_warns_and_is_set_from_it_when_unset():
    f = fires("best-metric-direction", ["training.metric_for_best_model=perplexity", "training.greater_is_better=true"],
              ["training.metric_for_best_model=perplexity"], severity="warning")
    assert f.message == "training.greater_is_better=True keeps the checkpoint with the highest perplexity"
    from sft_dist.train.args import build_sft_config

    # HF alone would guess "greater is better" for any name not ending in "loss"
    for metric, better in (("perplexity", False), ("eval_perplexity", False), ("loss", False),
                           ("mean_token_accuracy", True), ("rouge_l", True), ("eval_exact_match", True)):
        args = build_sft_config(load_config(QUICKSTART, [f"training.metric_for_best_model={metric}",
                                                         "metrics.generate_eval_rows=4"]), device="cpu")
        assert args.greater_is_better is better, metric
    args = build_sft_config(load_config(QUICKSTART, ["training.metric_for_best_model=perplexity",
                                                     "training.greater_is_better=true"]), device="cpu")
    assert args.greater_is_better is True  # given: kept (the warning says what it does)


def test_early_stopping_needs_evaluations_and_warns_without_the_best_at_the_end():
    f = fires("early-stopping-without-eval", ["training.early_stopping_patience=3", "training.eval_strategy=no"],
              ["training.early_stopping_patience=3"])
    assert "training.eval_strategy is 'no'" in f.message
    assert "early-stopping-without-eval" in findings("training.early_stopping_patience=3", "data.eval_files=null")
    best = ["training.early_stopping_patience=3", "training.load_best_model_at_end=true",
            "training.save_strategy=steps", "training.save_steps=50"]
    f = fires("early-stopping-keeps-last", ["training.early_stopping_patience=3"], best, severity="warning")
    assert "the saved adapter (or model) is the last step's, not the best's" in f.message
    assert not {"early-stopping-keeps-last", "early-stopping-without-eval"} & set(findings(*best))
    # `sft-dist evaluate` of a run that trained with it: nothing is trained, nothing to warn about
    assert not {"early-stopping-keeps-last", "early-stopping-without-eval"} & set(findings(
        "training.early_stopping_patience=3", "training.do_train=false"))


def test_a_per_device_loss_is_named_for_what_it_does():
    f = fires("loss-per-device", ["training.average_tokens_across_devices=false"],
              ["training.average_tokens_across_devices=false", "launcher.num_workers=1"], severity="warning")
    assert "a mean of per-rank means" in f.message and "2 ranks" in f.message


def test_save_only_model_is_said_to_be_ignored():
    f = fires("save-only-model-ignored", ["training.save_only_model=true"], [], severity="warning")
    assert "the setting is ignored" in f.message


def test_pushing_checkpoints_to_the_hub_is_refused():
    f = fires("hub-strategy-checkpoints", ["training.push_to_hub=true", "training.hub_strategy=checkpoint"],
              ["training.push_to_hub=true", "training.hub_strategy=end"])
    assert "sft_dist pushes the final adapter or model, once, at the end" in f.message
    assert "hub-strategy-checkpoints" not in findings("training.push_to_hub=true")  # HF's default every_save


def test_global_batch_not_divisible(tmp_path):
    def ds(train_batch_size):
        cfg = json.loads((DS / "zero2.json").read_text())
        cfg["train_batch_size"] = train_batch_size
        path = tmp_path / f"tbs{train_batch_size}.json"
        path.write_text(json.dumps(cfg))
        return ["backend.type=deepspeed", f"backend.config={path}"]

    f = fires("global-batch-not-divisible", ds(24), ds(16))  # 8 per device x 1 x 2 workers = 16
    assert "micro batch 8 x accumulation 1 x 2 workers = 16" in f.message
    assert "a multiple of 16" in f.fix
    assert "gradient_accumulation_steps: 2" in findings(*ds(32))["global-batch-not-divisible"].fix


def test_max_length_beyond_the_models_positions():
    f = fires("max-length-beyond-positions", ["data.max_length=1024"], ["data.max_length=512"])
    assert "512 positions" in f.message and "data.max_length <= 512" in f.fix


def test_zero3_adapter_export_needs_gathering_with_modules_to_save(tmp_path):
    cfg = json.loads((DS / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    path = tmp_path / "z3.json"
    path.write_text(json.dumps(cfg))
    f = fires("zero3-adapter-export", ["backend.type=deepspeed", f"backend.config={path}"], ZERO3)
    assert "modules_to_save copies (lm_head)" in f.message and "stage3_gather_16bit_weights_on_model_save" in f.fix


def test_hybrid_shard_size_must_divide_the_workers(tmp_path):
    hybrid = tmp_path / "hybrid.yaml"
    hybrid.write_text("sharding: hybrid_shard\nshard_size: 2\n")
    fires("hybrid-shard-size", ["backend.type=fsdp", f"backend.config={hybrid}", "launcher.num_workers=3"],
          ["backend.type=fsdp", f"backend.config={hybrid}", "launcher.num_workers=4"])


def test_packing_a_decoder_without_position_ids_is_refused():
    """From model.init_config's (or a local config.json's) model_type, where the class is imported: `sft-dist plan`
    and the workers' plan, before any weight loads (model/packed_positions.py checks a hub model where it loads)."""
    bloom = 'model.init_config={"model_type": "bloom", "hidden_size": 32, "n_layer": 1, "n_head": 2}'
    f = fires("packing-without-positions", [bloom, "data.packing=true"], [bloom, "data.packing=false"])
    assert f.message.startswith("BloomForCausalLM takes no position_ids") and "data.packing: false" in f.fix
    assert "packing-without-positions" not in findings("data.packing=true")  # Llama


def test_every_rule_has_its_test():
    import re
    from pathlib import Path

    tested = set(re.findall(r'fires\("([a-z0-9-]+)"', Path(__file__).read_text(encoding="utf-8")))
    assert tested == {r.id for r in RULES}


# Each refusal, end to end through both commands, before any model loads.
REFUSED = [
    ("qlora-fsdp-quant-storage", ["quantization.bits=4", "quantization.quant_storage=uint8", *FULL_SHARD]),
    ("int8-fsdp", ["quantization.bits=8", *FULL_SHARD]),
    ("dora-int8", ["quantization.bits=8", "lora.use_dora=true"]),
    ("dora-quantized-zero3", ["quantization.bits=4", "lora.use_dora=true", *ZERO3]),
    ("fp16-on-cpu", ["training.fp16=true"]),
    ("activation-offloading-on-cpu", ["training.activation_offloading=true"]),
    ("best-model-without-eval", ["training.load_best_model_at_end=true", "training.eval_strategy=no"]),
    ("early-stopping-without-eval", ["training.early_stopping_patience=3", "training.eval_strategy=no"]),
    ("best-metric-unknown", ["training.metric_for_best_model=eval_bleu"]),
    ("max-length-beyond-positions", ["data.max_length=1024"]),
    ("reentrant-checkpointing-lora", ["training.activation_checkpointing=true",
                                      "training.gradient_checkpointing_kwargs={use_reentrant: true}",
                                      "training.ddp_find_unused_parameters=true"]),
]


@pytest.mark.parametrize("rule, overrides", REFUSED, ids=[r for r, _ in REFUSED])
def test_plan_and_train_refuse_in_seconds(rule, overrides, tmp_path, capsys):
    out = tmp_path / "run"
    for command in ("plan", "train"):
        t0 = time.monotonic()
        rc = main([command, str(QUICKSTART), f"output_dir={out}", *overrides])
        text = capsys.readouterr()
        assert rc == 1 and time.monotonic() - t0 < 30
        said = text.out if command == "plan" else text.err
        assert f"[{rule}]" in said and ("Fix:" in said or "fix:" in said), said[-2000:]
    assert not out.exists()  # refused before anything was written


def test_plan_json_for_a_compatible_qlora_fsdp_setup(capsys):
    rc = main(["plan", str(QUICKSTART), "quantization.bits=4", *FULL_SHARD, "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0 and plan["verdict"] == "ok" and plan["rules"] == []
    assert plan["geometry"] == {"micro_batch": 8, "gradient_accumulation_steps": 1, "world_size": 2, "sequence_parallel": 1,
                                "global_batch": 16, "max_length": 128, "tokens_per_step_max": 2048,
                                "packing": False, "sampling": "random"}
    assert plan["setup"]["quantization"].startswith("4-bit bitsandbytes (storage float32")
    assert plan["config_diff"]["quantization.bits"] == {"value": 4, "default": None}
    assert plan["config_diff"]["training.learning_rate"] == {"value": 0.005, "default": 2e-05}
    assert "launcher.device" not in plan["config_diff"]
    assert plan["memory_per_rank"]["weights"] > 0 and plan["memory_per_rank"]["total"] > 0

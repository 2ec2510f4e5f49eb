"""`sft-dist generate`: why a completion is empty (one line on stderr), and remote code only from the command line
(issue 18: a run directory's config.yaml must not turn it on). Run directories are built here as training writes
them (config.yaml + model/ with a real tiny model and tokenizer saved by save_pretrained)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sft_dist.config.load import builtin_path
from sft_dist.errors import SftDistError
from sft_dist.generate import complete, generate, load_trained
from tests.conftest import BIN, cli_env

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             max_position_embeddings=64, tie_word_embeddings=False)


def run_dir(tmp_path: Path, *, favour: int, trust: bool = False, name: str = "run") -> Path:
    """A full fine-tuning run whose model always predicts token `favour`: every embedding row is the same vector,
    the blocks add nothing to the residual stream, and only that row of the head reads it."""
    tok = AutoTokenizer.from_pretrained(str(builtin_path("tokenizer")))
    config = AutoConfig.for_model("llama", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                  bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, **SHAPE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[favour].fill_(1.0)
    out = tmp_path / name
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    cfg = {"output_dir": str(out), "model": {"init_config": {"model_type": "llama"}, "trust_remote_code": trust},
           "data": {"format": "alpaca", "template": "alpaca"}}
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    return out


def test_eos_as_the_first_token_is_named(tmp_path, capsys):
    run = run_dir(tmp_path, favour=2)  # </s>
    [c] = complete(run, ["What is 2 + 2?"], max_new_tokens=8)
    assert (c.text, c.new_tokens) == ("", [2])
    assert c.why_empty.startswith("the model's first token was the stop token '</s>' (id 2), which ends the answer")
    capsys.readouterr()
    assert generate(run, ["What is 2 + 2?", "Hi"], max_new_tokens=8) == ["", ""]
    err = capsys.readouterr().err.splitlines()
    assert [line[:48] for line in err] == ["sft-dist: note: prompt 1 got an empty completion",
                                           "sft-dist: note: prompt 2 got an empty completion"]


def test_special_tokens_only_zero_budget_and_a_full_context_are_named(tmp_path):
    run = run_dir(tmp_path, favour=0)  # <pad>: special, not a stop token
    [c] = complete(run, ["What is 2 + 2?"], max_new_tokens=6)
    assert (c.text, c.new_tokens) == ("", [0] * 6)
    assert c.why_empty == ("the model generated 6 token(s) that decode to nothing but special tokens or whitespace: "
                           "'<pad>', '<pad>', '<pad>', '<pad>', '<pad>' ...")
    [c] = complete(run, ["What is 2 + 2?"], max_new_tokens=0)
    assert c.why_empty == "--max-new-tokens is 0"
    long_prompt = " ".join(["palavra"] * 80)
    [c] = complete(run, [long_prompt], max_new_tokens=8, raw=True)
    assert c.prompt_tokens >= 64 and c.new_tokens == []
    assert c.why_empty == (f"the prompt has {c.prompt_tokens} tokens and the model has 64 positions "
                           "(max_position_embeddings): no room left to generate; shorten the prompt")
    with pytest.raises(SftDistError, match="--max-new-tokens: got -1"):
        complete(run, ["x"], max_new_tokens=-1)


def test_a_non_empty_completion_has_no_note(tmp_path, capsys):
    run = run_dir(tmp_path, favour=40)
    [c] = complete(run, ["What is 2 + 2?"], max_new_tokens=3)
    assert c.new_tokens == [40, 40, 40] and c.text and c.why_empty is None
    capsys.readouterr()
    generate(run, ["What is 2 + 2?"], max_new_tokens=3)
    assert capsys.readouterr().err == ""


CONFIG_CODE = '''import os
import pathlib

from transformers import LlamaConfig

pathlib.Path(os.environ["SFT_DIST_REMOTE_CODE_MARKER"]).write_text("the repository's code ran")


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"
'''
MODEL_CODE = '''from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''


def remote_code_run(tmp_path: Path) -> Path:
    """A run whose model needs its own code (auto_map), and whose config.yaml asks for trust_remote_code."""
    run = run_dir(tmp_path, favour=40, trust=True, name="remote")
    model = run / "model"
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                            "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_tiny_remote.py").write_text(CONFIG_CODE)
    (model / "modeling_tiny_remote.py").write_text(MODEL_CODE)
    return run


def test_a_run_directory_cannot_turn_remote_code_on(tmp_path, monkeypatch):
    marker = tmp_path / "ran.txt"
    monkeypatch.setenv("SFT_DIST_REMOTE_CODE_MARKER", str(marker))
    run = remote_code_run(tmp_path)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["trust_remote_code"] is True
    with pytest.raises(SftDistError) as e:
        load_trained(run)
    assert str(e.value) == (f"{run / 'model'} needs to run code from its repository to load (the run's config.yaml "
                            "asks for model.trust_remote_code, which a run directory cannot turn on). Read that "
                            "code, then pass --trust-remote-code to allow it")
    assert not marker.exists()  # nothing of the repository's code ran
    # the caller's explicit permission: the code runs and the model generates
    model, _, _ = load_trained(run, trust_remote_code=True)
    assert type(model).__name__ == "TinyRemoteForCausalLM" and marker.exists()
    [c] = complete(run, ["What is 2 + 2?"], max_new_tokens=2, trust_remote_code=True)
    assert c.new_tokens == [40, 40]


@pytest.mark.slow
def test_the_cli_refuses_remote_code_in_one_line(tmp_path):
    env = {**cli_env(), "SFT_DIST_REMOTE_CODE_MARKER": str(tmp_path / "ran.txt")}
    run = remote_code_run(tmp_path)
    r = subprocess.run([str(BIN / "sft-dist"), "generate", str(run), "--prompt", "hi"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith("Read that code, then pass --trust-remote-code to allow it")
    assert not (tmp_path / "ran.txt").exists()
    # the command line's explicit flag (and only it) lets the repository's code run
    r = subprocess.run([str(BIN / "sft-dist"), "generate", str(run), "--prompt", "hi", "--max-new-tokens", "2",
                        "--trust-remote-code", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["prompt"] == "hi" and (tmp_path / "ran.txt").exists()


@pytest.mark.slow
def test_export_takes_remote_code_from_its_command_line_only(tmp_path):
    """The same for `sft-dist export`: the run's config.yaml asks for remote code; export refuses without the flag."""
    env = {**cli_env(), "SFT_DIST_REMOTE_CODE_MARKER": str(tmp_path / "ran.txt")}
    run = remote_code_run(tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config.update(lora={"enabled": False}, model={"name_or_path": str(run / "model"), "trust_remote_code": True})
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "run_summary.json").write_text(json.dumps({"global_step": 1, "backend": "ddp", "world_size": 1}))
    cmd = [str(BIN / "sft-dist"), "export", str(run), "--output", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "needs to run code from its repository to load" in r.stderr and "--trust-remote-code" in r.stderr
    assert not (tmp_path / "ran.txt").exists() and not (tmp_path / "out").exists()
    r = subprocess.run([*cmd, "--trust-remote-code"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "exported full model" in r.stdout and (tmp_path / "ran.txt").exists()
    assert (tmp_path / "out" / "modeling_tiny_remote.py").is_file()  # the merged model loads next to its code


def random_run(tmp_path: Path) -> Path:
    """A run whose model has random weights: many tokens likely at every step, for sampling and beams."""
    run = run_dir(tmp_path, favour=40, name="random")
    config = AutoConfig.from_pretrained(run / "model")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # a spread of likely tokens, not one that dominates
    model.save_pretrained(run / "model")
    return run


def test_sampling_is_repeatable_with_a_seed_and_top_k_1_is_greedy(tmp_path):
    from sft_dist.generate import Decoding

    run = random_run(tmp_path)
    prompts = ["What is 2 + 2?", "Hi"]
    greedy = [c.new_tokens for c in complete(run, prompts, max_new_tokens=12)]
    seeded = [[c.new_tokens for c in complete(run, prompts, max_new_tokens=12,
                                              decoding=Decoding(temperature=1.5, seed=s))] for s in (7, 7, 8)]
    assert seeded[0] == seeded[1]  # the same seed: the same completions
    assert seeded[0] != seeded[2] and seeded[0] != greedy  # sampling really samples here
    # the likeliest token only, sampled: greedy decoding, whatever the temperature and seed
    top1 = complete(run, prompts, max_new_tokens=12, decoding=Decoding(temperature=2.0, top_k=1, seed=3))
    assert [c.new_tokens for c in top1] == greedy
    # a nucleus too small to hold a second token: greedy as well
    nucleus = complete(run, prompts, max_new_tokens=12, decoding=Decoding(temperature=1.0, top_p=1e-6, seed=5))
    assert [c.new_tokens for c in nucleus] == greedy


def test_beam_search_finds_a_likelier_sequence_than_greedy(tmp_path):
    """Beam search returns the most likely sequence of those it kept: here one greedy's first choices missed."""
    from sft_dist.generate import Decoding, load_trained

    run = random_run(tmp_path)
    model, tok, cfg = load_trained(run)
    from sft_dist.generate import format_prompt

    enc = tok(format_prompt(cfg, tok, "Hi"), return_tensors="pt")
    n = enc["input_ids"].shape[1]

    def logprob(new: list[int]) -> float:
        ids = torch.cat([enc["input_ids"], torch.tensor([new])], dim=1)
        with torch.no_grad():
            logp = model(ids).logits[0, n - 1:-1].log_softmax(-1)
        return float(logp.gather(1, torch.tensor(new)[:, None]).sum())

    [greedy] = complete(run, ["Hi"], max_new_tokens=6)
    [beam] = complete(run, ["Hi"], max_new_tokens=6, decoding=Decoding(num_beams=4))
    assert len(beam.new_tokens) == len(greedy.new_tokens) == 6  # no stop token met: equal lengths compare
    assert beam.new_tokens != greedy.new_tokens  # greedy's first choices lead to a less likely sequence here
    assert logprob(beam.new_tokens) > logprob(greedy.new_tokens)


@pytest.mark.parametrize("decoding, message", [
    (dict(top_p=0.9), "--top-p applies to sampling: give --temperature > 0 with it"),
    (dict(top_k=5), "--top-k applies to sampling"),
    (dict(temperature=1.0, top_p=1.5), "--top-p: got 1.5; must be in (0, 1]"),
    (dict(temperature=1.0, top_k=0), "--top-k: got 0; must be >= 1"),
    (dict(temperature=-1.0), "--temperature: got -1.0; must be >= 0"),
    (dict(num_beams=0), "--num-beams: got 0"),
    (dict(num_beams=2, temperature=0.7), "--num-beams with --temperature > 0: choose beam search or sampling"),
    (dict(repetition_penalty=0.0), "--repetition-penalty: got 0.0"),
])
def test_bad_decoding_options_are_refused_before_the_model_loads(tmp_path, decoding, message):
    from sft_dist.generate import Decoding

    with pytest.raises(SftDistError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
                       .replace("+", r"\+")):
        complete(tmp_path / "no-such-run", ["x"], decoding=Decoding(**decoding))


def test_cuda_without_a_gpu_is_one_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(SftDistError, match="^--device cuda: no CUDA device is visible to this process"):
        complete(run_dir(tmp_path, favour=40), ["x"], device="cuda")


@pytest.mark.slow
def test_the_cli_streams_the_completion_it_would_print_whole(tmp_path):
    run = random_run(tmp_path)
    base = [str(BIN / "sft-dist"), "generate", str(run), "--prompt", "What is 2 + 2?", "--prompt", "Hi",
            "--max-new-tokens", "10", "--temperature", "1.2", "--seed", "4"]
    whole = subprocess.run([*base, "--json"], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    texts = [json.loads(line)["completion"] for line in whole.stdout.strip().splitlines()]
    streamed = subprocess.run([*base, "--stream"], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    blocks = streamed.stdout.split(">>> ")[1:]
    assert [b.split("\n", 1)[0] for b in blocks] == ["What is 2 + 2?", "Hi"]
    assert [b.split("\n", 1)[1].strip() for b in blocks] == texts and any(texts)
    bad = subprocess.run([*base, "--stream", "--json"], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "--stream prints text as it comes; --json prints one JSON line per completion: pick one" in bad.stderr

"""`sft-dist export`: a training checkpoint (or a finished run's adapter/ or model/) -> a Hugging Face adapter or
merged model, offline on CPU. It reads checkpoints (checkpoint/) and never trains.

- run.py: the command (parser, run_export, summary, export.json)
- source.py: which checkpoint, the run config that wrote it, where the base model and tokenizer are
- weights.py: the trained tensors of a DCP or DeepSpeed checkpoint, one at a time
- model.py: the model the tensor names refer to (meta device), adapter names, how each LoRA layer merges
- merge.py: `--merge`, streaming base + deltas into safetensors shards
- quant.py: `--dequantize`, the bitsandbytes round trip a QLoRA base went through
"""

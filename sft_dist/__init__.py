"""sft_dist: distributed supervised fine-tuning of causal LMs, one config on every launcher."""

__version__ = "0.1.0"

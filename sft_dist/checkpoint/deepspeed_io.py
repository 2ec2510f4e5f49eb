"""DeepSpeed reads its checkpoint files with `torch.load(weights_only=False)`, which runs whatever a pickle
says. sft_dist swaps in a checkpoint engine that loads with `weights_only=True`, allowing only the few
DeepSpeed and Python types its checkpoints hold."""

from __future__ import annotations

import torch


def safe_globals() -> list:
    import argparse
    import collections

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [argparse.Namespace, collections.OrderedDict, ZeroStageEnum, LossScaler, DynamicLossScaler,
            fragment_address, torch.Size]


def load_weights_only(path: str, map_location=None):
    with torch.serialization.safe_globals(safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def use_weights_only_loading(engine) -> None:
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location)

    if type(engine.checkpoint_engine).__name__ != "WeightsOnlyCheckpointEngine":
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)

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
    import pickle

    from sft_dist.checkpoint.dcp_safe import UntrustedCheckpoint

    with torch.serialization.safe_globals(safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UntrustedCheckpoint(f"{path}: refused to unpickle ({str(e).splitlines()[0]})") from None


def use_weights_only_loading(engine) -> None:
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location)

    if type(engine.checkpoint_engine).__name__ != "WeightsOnlyCheckpointEngine":
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)

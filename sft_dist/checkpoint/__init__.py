"""Sharded, atomic, verified training checkpoints (see README "Checkpoints").

A checkpoint is a directory `checkpoint-<step>` under the checkpoint root (a local path or an fsspec URL):
the backend's shards (torch.distributed.checkpoint for DDP/FSDP2, DeepSpeed's ZeRO files), the train state
(scheduler, scaler, RNG per rank, trainer state with the data cursor), the run's config, and
`manifest.json`, written last. Only a directory whose manifest checks out is ever loaded.
"""

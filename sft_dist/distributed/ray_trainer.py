"""Ray Train's `TorchTrainer` without the helpers sft_dist's runs have no use for (Ray 2.60, Train v2, read in
`ray/train/v2`). Each helper is an actor, i.e. one more Python process importing Ray (1.2-1.7 CPU s each,
measured by bench/ray_speed.py), started while the training workers start:

- no `DatasetManager`: sft_dist hands Ray no Ray Datasets (its own data loader feeds each rank);
- no placement-group cleaner: a detached actor that removes the run's placement group when the controller
  dies while its driver lives on. sft_dist's driver does not live on: `fit()` raises when the controller dies,
  the driver exits, and Ray removes the placement groups of a job whose driver is gone;
- a ConfigError or DataError raised on any rank ends the run instead of restarting the worker group: it
  would fail the same way on every attempt `launcher.max_failures` allows. A killed or crashed worker, or any
  other error, is still retried;
- on the private cluster this process started (`private=True`), no autoscaling-coordinator request: a fixed
  single node has nothing to scale, and Ray waits for that actor (~1 s) before starting any worker. On a shared
  cluster it stays (one detached actor per cluster, started by the first run).

Ray's internals move between releases: this module imports them at the top, and `ray_train` falls back to
the stock trainer when that import fails.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
from ray.train.v2.api.exceptions import WorkerGroupError

from sft_dist.distributed.ray_train import user_error


class UserErrorsFinal(DefaultFailurePolicy):
    """Ray's policy, except that a ConfigError or DataError raised on any rank is not retried."""

    def make_decision(self, training_failed_error):
        if isinstance(training_failed_error, WorkerGroupError) and any(
                user_error(e, final_only=True) for e in training_failed_error.worker_failures.values()):
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class FixedNoAutoscaler(FixedScalingPolicy):
    """A fixed worker count that asks no autoscaling coordinator for resources (the node is all there is)."""

    def after_controller_start(self, train_run_context):
        pass

    def _maybe_send_resource_request(self):
        pass


class SharedClusterTrainer(TorchTrainer):
    _skip_callbacks = (DatasetsCallback, PlacementGroupCleanerCallback)
    _scaling_policy = FixedScalingPolicy

    def _create_default_callbacks(self):
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, self._skip_callbacks)]

    def _initialize_and_run_controller(self, **kwargs):
        # The controller gets both policies pickled: their classes must stay importable (module level).
        if type(kwargs.get("failure_policy")) is DefaultFailurePolicy:
            kwargs["failure_policy"] = UserErrorsFinal(self.run_config.failure_config)
        if type(kwargs.get("scaling_policy")) is FixedScalingPolicy:
            kwargs["scaling_policy"] = self._scaling_policy(self.scaling_config)
        return super()._initialize_and_run_controller(**kwargs)


class PrivateClusterTrainer(SharedClusterTrainer):
    _scaling_policy = FixedNoAutoscaler


def trainer_class(*, private: bool) -> type:
    return PrivateClusterTrainer if private else SharedClusterTrainer

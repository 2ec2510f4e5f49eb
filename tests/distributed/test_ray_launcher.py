"""The Ray launcher's trimmed trainer and failure reporting, without a Ray cluster: which of Ray Train's helper
actors it leaves out, which failures it does not retry, and the one message a user error becomes."""

from __future__ import annotations

import pickle

import pytest

pytest.importorskip("ray.train")

from ray.train import FailureConfig, RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchConfig  # noqa: E402
from ray.train.v2._internal.callbacks import DatasetsCallback  # noqa: E402
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback  # noqa: E402
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision  # noqa: E402
from ray.train.v2.api.exceptions import WorkerGroupError  # noqa: E402

from sft_dist.distributed.ray_train import describe_failure  # noqa: E402
from sft_dist.distributed.ray_trainer import (  # noqa: E402
    FixedNoAutoscaler,
    PrivateClusterTrainer,
    SharedClusterTrainer,
    UserErrorsFinal,
    trainer_class,
)
from sft_dist.errors import ConfigError, DataError, SftDistError  # noqa: E402


def _train(config):  # never runs: the trainers below are only built
    pass


@pytest.mark.parametrize("private", [True, False])
def test_no_dataset_manager_or_placement_group_cleaner(tmp_path, private):
    trainer = trainer_class(private=private)(
        _train, train_loop_config={}, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="t", storage_path=str(tmp_path), failure_config=FailureConfig(max_failures=2)))
    kinds = [type(cb) for cb in trainer._create_default_callbacks()]
    assert DatasetsCallback not in kinds and PlacementGroupCleanerCallback not in kinds
    assert isinstance(trainer, PrivateClusterTrainer if private else SharedClusterTrainer)


def test_a_private_cluster_asks_no_autoscaling_coordinator():
    policy = FixedNoAutoscaler(ScalingConfig(num_workers=2))
    policy.after_controller_start(None)  # Ray's would create the coordinator actor (needs a cluster) here
    assert policy._coordinator_client is None
    assert policy.make_decision_for_non_running_worker_group().num_workers == 2


def _failure(*errors: BaseException) -> WorkerGroupError:
    return WorkerGroupError("failed", dict(enumerate(errors)))


@pytest.mark.parametrize("errors, decision", [
    # a user error on any rank (the other may die of the lost peer): every retry would fail alike
    ((ConfigError("training: bad"), ConnectionResetError("peer")), FailureDecision.RAISE),
    ((DataError("train.jsonl line 3: not JSON"),), FailureDecision.RAISE),
    # a crash or a killed worker is what max_failures is for
    ((RuntimeError("segfault"), RuntimeError("segfault")), FailureDecision.RETRY),
    ((SftDistError("rank 1 never joined"),), FailureDecision.RETRY),
])
def test_user_errors_are_not_retried(errors, decision):
    policy = UserErrorsFinal(FailureConfig(max_failures=3))
    assert policy.make_decision(_failure(*errors)) == decision


def test_one_message_for_a_user_error_every_rank_raised():
    same = _failure(ConfigError("training: bad"), ConfigError("training: bad"))
    assert describe_failure(same) == "error: invalid config:\n  - training: bad"  # what the local launcher prints
    mixed = describe_failure(_failure(ConfigError("training: bad"), RuntimeError("peer gone")))
    assert mixed.splitlines()[0] == "worker rank 0: invalid config:"
    assert "worker rank 1 failed:\npeer gone" in mixed


def test_config_error_survives_pickling():
    """Ray sends a worker's error to the controller, then to the driver: its message must not nest."""
    e = ConfigError(["a", "b"])
    twice = pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(e))))
    assert str(twice) == str(e) and twice.problems == ["a", "b"]


def test_embedded_dashboard_agent_takes_any_port():
    """Ray's fixed 52365 is taken whenever another Ray node runs on the machine: ray.init then waited ~3.5 s."""
    import ray._private.parameter as parameter

    from sft_dist.distributed.ray_train import _agent_on_any_port

    stock = parameter.RayParams
    with _agent_on_any_port():
        assert parameter.RayParams().dashboard_agent_listen_port == 0  # Ray's "any free port" for the agent
    assert parameter.RayParams is stock and stock().dashboard_agent_listen_port == 52365

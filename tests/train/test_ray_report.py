"""RayReport's report points: the same count at the same steps on every rank, none per logged step, the latest
metrics with each save and at the end (no Ray needed: `send` stands in for `ray.train.report`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

from sft_dist.train.ray_report import RayReport, read_pointer
from sft_dist.train.run import RunResult


class FakeCheckpointing:
    world_size = 2

    def __init__(self):
        self.saved: list[str] = []

    class store:  # noqa: N801 - stands in for the CheckpointManager's store
        @staticmethod
        def display(name: str) -> str:
            return f"/ckpt/{name}"


def simulate(rank: int, *, steps: int = 25, save_every: int = 10, stopped: bool = False) -> list[tuple]:
    """A 2-rank run's callbacks as HF calls them on `rank`: a log every step (eval every 10), saves, the end."""
    sent = []

    def send(metrics: dict, pointer_dir: str | None) -> None:
        pointer = None
        if pointer_dir is not None:
            pointer = read_pointer(pointer_dir)
            assert len(list(Path(pointer_dir).iterdir())) == 1
            shutil.rmtree(pointer_dir)  # Ray deletes it after the ASYNC upload
        sent.append((metrics, pointer))

    report = RayReport(send=send)
    ck = FakeCheckpointing()
    report.attach(SimpleNamespace(checkpointing=ck, is_world_process_zero=lambda: rank == 0))
    for step in range(1, steps + 1):
        state = SimpleNamespace(global_step=step, is_world_process_zero=rank == 0)
        report.on_log(None, state, None, logs={"loss": 10.0 - step / 10, "learning_rate": 1e-3, "epoch": step / 25})
        if step % 10 == 0:
            report.on_log(None, state, None, logs={"eval_loss": 5.0 - step / 10, "eval_runtime": 0.1})
        if step % save_every == 0:
            ck.saved.append(f"checkpoint-{step}")
            report.on_save(None, state, None)
    state = SimpleNamespace(global_step=steps, is_world_process_zero=rank == 0)
    report.on_log(None, state, None, logs={"train_runtime": 3.0, "train_loss": 8.0, "flag": True})
    report.finish(RunResult(Path("/out"), Path("/out/adapter"), steps, 2, stopped=stopped))
    return sent


def test_reports_at_saves_and_the_end_only_the_same_on_every_rank():
    rank0, rank1 = simulate(0), simulate(1)
    # 25 logged steps, 2 saves, the end: 3 reports, not 25 (each would wait up to 2 s for Ray's controller)
    assert [m["step"] for m, _ in rank0] == [m["step"] for m, _ in rank1] == [10, 20, 25]
    assert all(p is None for _, p in rank1)  # only rank 0 attaches the pointer
    assert [p["checkpoint"] for _, p in rank0] == ["/ckpt/checkpoint-10", "/ckpt/checkpoint-20", "/ckpt/checkpoint-20"]
    assert [p["step"] for _, p in rank0] == [10, 20, 25] and rank0[-1][1]["final"] == "/out/adapter"
    assert "final" not in rank0[0][1]
    # the latest value of every metric, HF's closing summary included; non-numbers are left out
    end = rank0[-1][0]
    assert end["loss"] == 10.0 - 25 / 10 and end["eval_loss"] == 5.0 - 20 / 10 and end["train_loss"] == 8.0
    assert "flag" not in end
    assert rank0[0][0]["loss"] == 9.0 and rank0[0][0]["eval_loss"] == 4.0


def test_a_run_without_checkpoints_still_reports_its_end():
    sent = simulate(0, save_every=1000)
    assert len(sent) == 1
    metrics, pointer = sent[0]
    assert metrics["step"] == 25 and pointer == {"checkpoint": None, "final": "/out/adapter", "step": 25,
                                                  "world_size": 2}


def test_a_stopped_run_points_to_its_checkpoint_not_to_final_weights():
    _, pointer = simulate(0, stopped=True)[-1]
    assert pointer["final"] is None and pointer["checkpoint"] == "/ckpt/checkpoint-20"

"""Pushing to the Hugging Face Hub: a run's final adapter (or model) with its tokenizer, uploaded once when the run
is done (`training.push_to_hub`), and an export (`sft-dist export --push-to-hub REPO`).

HF's Trainer would push from its own checkpoint and save methods: sft_dist replaces the first (its sharded
checkpoints), so nothing was pushed during training, and its final `save_model` then uploaded the whole
output_dir (sft_dist's checkpoints/ with their optimizer states, base_model/, the data trace). So the Trainer is
built with push_to_hub off, and rank 0 uploads exactly the final directory here, after everything is saved: a
failed upload leaves the trained run whole and says how to upload it by hand.

`hub_strategy`: `end` and HF's default `every_save` both mean one push at the end here (sft_dist's checkpoints are
its own sharded format, not a model a Hub repo can serve); `checkpoint` / `all_checkpoints` are refused by the plan.
The token is the environment's (HF_TOKEN, where `training.hub_token` is put: train/args.py), never a file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sft_dist.errors import SftDistError

log = logging.getLogger("sft_dist")


@dataclass(frozen=True)
class HubPush:
    repo_id: str
    private: bool | None
    revision: str | None

    def upload(self, folder: Path, *, message: str, key: str = "training.push_to_hub") -> str:
        """Create the repo if needed and upload `folder`'s files to its root; the commit's URL. `key`: the option
        that asked for it, named in the error."""
        from huggingface_hub import HfApi

        api = HfApi()
        try:
            api.create_repo(self.repo_id, private=self.private, exist_ok=True)
            if self.revision:
                api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
            info = api.upload_folder(repo_id=self.repo_id, folder_path=str(folder), revision=self.revision,
                                     commit_message=message)
        except Exception as e:  # noqa: BLE001 - any failure: the run is saved; say how to finish by hand
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise SftDistError(
                f"{key}: {folder} is written, but uploading it to the Hub repo {self.repo_id!r} failed "
                f"({type(e).__name__}: {first}). Check HF_TOKEN (or training.hub_token) and the network, then upload "
                f"it with: huggingface-cli upload {self.repo_id} {folder} .") from None
        url = getattr(info, "commit_url", None) or str(info)
        log.info("pushed %s to the Hub: %s", folder, url)
        return url


def hub_push(training, output_dir: str) -> HubPush | None:
    """What `training.push_to_hub` asks for, or None. The repo: `hub_model_id`, else the output directory's name
    (the Trainer's default), under the token's user."""
    if not training.get("push_to_hub"):
        return None
    repo = training.get("hub_model_id") or Path(output_dir).name
    return HubPush(repo_id=str(repo), private=training.get("hub_private_repo"), revision=training.get("hub_revision"))

"""Packing: tokenized documents, best-fit decreasing, into rows of at most `data.max_length` tokens, each
document kept whole and isolated.

A packed row holds its documents' tokens back to back, `position_ids` restarting at 0 for every document,
`seq_lengths`, and the `sample_ids` it holds. Isolation then rests on two things, both tested:
- the label of each document's first token is ignored: it would be predicted from the previous document;
- the batch reaches the model with position_ids and no attention_mask (`PackedCollator`): transformers then
  builds a block-diagonal causal mask from the position_ids (sdpa, eager; a document block mask for
  flex_attention, whose kernel then skips the blocks across documents), and flash attention, given the
  micro-batch flattened into one row, reads the same boundaries as cu_seq_lens.
Tested on CPU for eager, sdpa and flex_attention (tests/data/test_packing.py); on a GPU, bench/gpu.py's
`isolation` step checks every implementation installed there, flash attention included.
"""

from __future__ import annotations

import bisect
import dataclasses

from datasets import Dataset

from sft_dist.data.formats import IGNORE


def bfd_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of `lengths` grouped into bins of total length <= capacity.

    Longest first (ties by index); each goes to the bin with the least room that fits it (ties: the older
    bin), else to a new bin. Deterministic: the same lengths give the same bins.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    room: list[tuple[int, int]] = []  # (free tokens, bin index), sorted: the best fit is a bisect away
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"document {i} has {n} tokens, more than the row length {capacity}")
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, b = room.pop(k)
        else:
            free, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if free > n:
            bisect.insort(room, (free - n, b))
    return bins


def pack_dataset(ds: Dataset, max_length: int) -> Dataset:
    """Pack the rows of a tokenized dataset (input_ids, labels, sample_id) into rows of input_ids, labels,
    position_ids, seq_lengths and sample_ids."""
    ids, labels, sample = ds["input_ids"], ds["labels"], ds["sample_id"]
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": [], "sample_ids": []}
    for b in bfd_bins([len(x) for x in ids], max_length):
        row_ids, row_labels, positions = [], [], []
        for i in b:
            row_ids += ids[i]
            row_labels += [IGNORE] + labels[i][1:]  # the first token is predicted from the previous document
            positions += range(len(ids[i]))
        rows["input_ids"].append(row_ids)
        rows["labels"].append(row_labels)
        rows["position_ids"].append(positions)
        rows["seq_lengths"].append([len(ids[i]) for i in b])
        rows["sample_ids"].append([sample[i] for i in b])
    return Dataset.from_dict(rows)


# Attention implementations whose mask transformers builds in masking_utils: with position_ids and no
# attention_mask it finds the documents of every row (any batch size) and masks across them.
ROW_AWARE = ("sdpa", "eager", "flex_attention")


class PackedCollator:
    """Collates packed rows so that no document attends to another, around TRL's collator (and unpacked rows,
    each one document, where the attention reads boundaries: train/run.py's padding-free case).

    sdpa/eager/flex: one row per packed row, position_ids from `seq_lengths`, no attention_mask (with one,
    transformers ignores the position_ids' boundaries); the rows are near-full, so little padding.
    Anything else (flash attention): padding-free, the micro-batch flattened into one row with cu_seq_lens,
    since flash attention only reads the boundaries of a single row. On sdpa that would cost attention over
    the whole flattened micro-batch, which is why it is not used there.

    `pad_to`: pad each batch to a multiple of this many tokens (data.max_length under training.torch_compile:
    a batch narrower than the last would compile the whole model again for the new shape); a flattened
    micro-batch of n rows to n x pad_to exactly, one width whatever its rows hold. Padding tokens carry no label
    and position 0 each, so each is a document of its own that nothing else attends to.
    """

    def __init__(self, inner, *, attn_implementation: str | None, pad_to: int | None = None):
        self.flatten = attn_implementation not in ROW_AWARE
        # varlen_attention also gets the boundaries themselves, computed here on the CPU: found from the
        # position_ids on the GPU they would cost a device sync in every layer.
        self.send_boundaries = attn_implementation == "varlen_attention"
        self.pad_to = pad_to
        self.inner = dataclasses.replace(inner, padding_free=self.flatten, return_position_ids=not self.flatten,
                                         pad_to_multiple_of=pad_to or inner.pad_to_multiple_of)

    def __call__(self, examples):
        inner = self.inner
        if self.flatten and self.pad_to:
            inner = dataclasses.replace(inner, pad_to_multiple_of=len(examples) * self.pad_to)
        batch = inner(examples)
        batch.pop("attention_mask", None)
        if self.send_boundaries:
            # under torch.compile (pad_to) the longest document is given as the row length, which bounds it:
            # an int that changed with every batch would compile the model again
            batch.update(boundaries(batch["position_ids"], longest=self.pad_to))
        # A KV cache also makes transformers skip the boundaries; the trainers pass use_cache=False, but a
        # batch that is only right with it says so itself.
        batch["use_cache"] = False
        return batch


def boundaries(position_ids, *, longest: int | None = None) -> dict:
    """The documents of one flattened row as flash attention's batch keys: cumulative lengths (int32) and the
    longest document (or `longest`, an upper bound of it)."""
    from sft_dist.model.varlen import cu_seq_lens

    cu, found = cu_seq_lens(position_ids)
    longest = max(found, longest or 0)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}

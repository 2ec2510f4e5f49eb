"""Sequence parallelism (`backend.sequence_parallel_size`, DeepSpeed-Ulysses' scheme): each rank of a group of
`size` ranks holds 1/size of every row's tokens, so a row `size` times longer fits the same activation memory.

The ranks of a group get the same micro-batch (the sampler deals by data-parallel rank: `Layout`). `split` pads the
batch to a multiple of `size`, shifts the labels over the whole row (a slice's last token is scored on the next
slice's first token) and keeps this rank's slice of the sequence. Everything in a decoder but attention works on
one token at a time, so it runs on the slice as it is. Attention is registered with transformers as `NAME`: an
all-to-all trades the slice of tokens for a slice of heads (every token, heads/size heads), the model's own
attention implementation (`inner`: sdpa, eager, flex, varlen or flash attention) runs on the whole rows for those
heads, with the whole rows' document mask (flex: as a BlockMask) or boundaries (packing stays isolated), and a second
all-to-all trades back.
Gradients go back through the same all-to-alls (torch's functional collective, which the compiler also traces). The loss of each slice is a sum over its
tokens divided by the step's loss tokens counted once per group, so the group's gradients add up to the
unsplit row's.

Why this scheme: it works with any attention kernel, masks included (ring attention needs its own kernel), and
costs two all-to-alls of q, k, v and the output per layer. Heads that `size` does not divide are laid out by
`Heads`: k/v heads repeated, zero heads added where the counts do not split evenly (28 query heads over 8 ranks
attend as 32: a seventh more attention work, no limit on `size`).

Outside a split forward (generation, a model called by other code) the attention is the inner one, unchanged.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import torch

from sft_dist.model.unwrap import base_model

NAME = "sft_dist_ulysses"
KEY = "backend.sequence_parallel_size"
FLASH_LIKE = ("varlen_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")
INNER = ("sdpa", "eager", "flex_attention", *FLASH_LIKE)
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass(frozen=True)
class Layout:
    """Where a rank stands: its sequence-parallel group (consecutive ranks, so a group stays on one node where
    the node's ranks are consecutive) and its data-parallel rank (the group's index)."""

    size: int
    rank: int  # within the group: which slice of the sequence
    dp_rank: int
    dp_world: int

    @classmethod
    def of(cls, rank: int, world: int, size: int) -> "Layout":
        if size < 1 or world % size:  # torchrun's world is known only when the workers start
            from sft_dist.errors import ConfigError

            raise ConfigError(f"{KEY}: {size} does not divide the {world} workers; each group of {size} workers "
                              "trains the same rows")
        return cls(size=size, rank=rank % size, dp_rank=rank // size, dp_world=world // size)


@dataclass(frozen=True)
class Heads:
    """How one layer's heads are laid out so that `size` ranks get equal shares: k/v heads padded with zero heads
    to `kv_padded`, each repeated `repeat` times, and each k/v head's query heads padded with zero heads to
    `group_padded`, so query head j of k/v head a stays with it. A zero query attends evenly and its output is
    dropped; a zero k/v head serves only zero queries. The layout is the one with the fewest query heads per rank
    (the attention work), then the fewest k/v heads sent."""

    heads: int
    kv: int
    size: int
    kv_padded: int
    repeat: int
    group_padded: int

    @classmethod
    def of(cls, heads: int, kv: int, size: int) -> "Heads":
        group = heads // kv
        if kv % size == 0:  # the common case (each rank whole k/v heads and their query heads): asked every layer
            return cls(heads, kv, size, kv, 1, group)
        best = None
        for kv_padded in range(kv, kv + size + 1):
            for repeat in range(1, size + 1):
                if kv_padded * repeat % size:
                    continue
                group_padded = -(-group // repeat) * repeat
                cost = (kv_padded * group_padded, kv_padded * repeat)
                if best is None or cost < best[0]:
                    best = (cost, cls(heads, kv, size, kv_padded, repeat, group_padded))
        return best[1]

    @property
    def padded(self) -> int:
        """Query heads after padding: `size` times each rank's share."""
        return self.kv_padded * self.group_padded

    @property
    def plain(self) -> bool:
        return self.padded == self.heads and self.repeat == 1

    def describe(self) -> str:
        """One line for the log: each rank's share and what the layout adds."""
        share = f"{self.heads} query heads ({self.kv} k/v) split {self.size} ways: {self.padded // self.size} per rank"
        return ", ".join([share, *self.extras()])

    def extras(self) -> list[str]:
        """What the layout adds to an even split (nothing where the heads divide)."""
        out = []
        if self.padded > self.heads:
            extra = self.padded - self.heads
            out.append(f"{extra} zero head{'s' if extra > 1 else ''} added (attention costs as for {self.padded} "
                       f"heads: +{self.padded / self.heads - 1:.0%})")
        if self.repeat > 1:
            out.append(f"each k/v head repeated {self.repeat}x")
        return out

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """(B, heads, s, D) -> (B, padded, s, D)."""
        if self.padded == self.heads:
            return q
        b, _, s, d = q.shape
        q = q.reshape(b, self.kv, self.heads // self.kv, s, d)
        q = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, self.group_padded - q.shape[2], 0, self.kv_padded - self.kv))
        return q.reshape(b, self.padded, s, d)

    def key_value(self, x: torch.Tensor) -> torch.Tensor:
        """(B, kv, s, D) -> (B, kv_padded * repeat, s, D)."""
        if self.kv_padded > self.kv:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, self.kv_padded - self.kv))
        return x.repeat_interleave(self.repeat, dim=1) if self.repeat > 1 else x

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """(B, s, padded, D) -> (B, s, heads, D): the zero heads dropped."""
        if self.padded == self.heads:
            return out
        b, s, _, d = out.shape
        out = out.reshape(b, s, self.kv_padded, self.group_padded, d)[:, :, :self.kv, :self.heads // self.kv]
        return out.reshape(b, s, self.heads, d)

    def per_head(self, values: torch.Tensor, rank: int) -> torch.Tensor:
        """A per-query-head parameter (learned attention sinks, (heads,)) -> this rank's heads' values."""
        share = self.padded // self.size
        return self.query(values.reshape(1, -1, 1, 1)).reshape(-1)[rank * share:(rank + 1) * share]


@dataclass
class _State:
    group: object = None  # the process group of this rank's sequence-parallel group
    layout: Layout | None = None
    inner: str | None = None
    rows: "Rows | None" = None  # the whole rows of the forward in progress (set by `active`)


_STATE = _State()


def new_groups(layout: Layout, world: int):
    """Create every group's process group (every rank creates all of them, in the same order) and keep this
    rank's. Call once, after the default process group exists."""
    import torch.distributed as dist

    mine = None
    for g in range(world // layout.size):
        pg = dist.new_group(list(range(g * layout.size, (g + 1) * layout.size)))
        if g == layout.dp_rank:
            mine = pg
    _STATE.group, _STATE.layout = mine, layout
    return mine


def model_heads(config, size: int) -> Heads | None:
    """The head layout of a transformers config's attention split `size` ways (None where it names no heads)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    if not heads:
        return None
    return Heads.of(int(heads), int(getattr(text, "num_key_value_heads", None) or heads), size)


def enable(model, inner: str) -> None:
    """Make the model's attention `NAME` around `inner` (its current implementation)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if inner not in INNER:  # e.g. a hub kernel
        from sft_dist.errors import ConfigError

        raise ConfigError(f"{KEY}: the model's attention {inner!r} cannot be split across workers; set "
                          "model.attn_implementation to sdpa, eager, flex_attention, varlen_attention or "
                          "flash_attention_2")
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_function)
    _STATE.inner = inner
    base = base_model(model)
    for config in _configs(base.config):
        if getattr(config, "_attn_implementation", None) == inner:
            config._attn_implementation = NAME


@contextlib.contextmanager
def unsplit(model):
    """The model's attention back to the implementation inside (`enable` undone) for the forwards in the block:
    whole rows on one rank, as the packing check runs them on every rank (train/packing_check.py)."""
    base = base_model(model)
    split = [c for c in _configs(base.config) if getattr(c, "_attn_implementation", None) == NAME]
    for config in split:
        config._attn_implementation = _STATE.inner
    try:
        yield
    finally:
        for config in split:
            config._attn_implementation = NAME


def _configs(config):
    yield config
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None:
            yield sub


@dataclass
class Rows:
    """The whole rows of a split batch, as the inner attention needs them: position_ids (documents restart at 0),
    and for flash-like kernels their boundaries."""

    position_ids: torch.Tensor  # (B, S)
    boundaries: dict | None = None
    _masks: dict = field(default_factory=dict)

    def block_mask(self, window: int | None):
        """The same document-causal mask as flex attention's BlockMask: blocks across documents are skipped, and no
        (S, S) tensor exists (built compiled on a GPU, as transformers builds its own)."""
        key = ("flex", window)
        if key not in self._masks:
            from torch.nn.attention.flex_attention import create_block_mask

            pos = self.position_ids
            doc = (pos == 0).cumsum(-1)

            def same_document_causal(b, h, q, kv):
                allowed = (doc[b, q] == doc[b, kv]) & (kv <= q)
                return allowed & (q - kv < window) if window else allowed

            b, t = pos.shape
            self._masks[key] = create_block_mask(same_document_causal, b, None, t, t, device=pos.device,
                                                 _compile=pos.device.type == "cuda")
        return self._masks[key]

    def mask(self, inner: str, dtype: torch.dtype, window: int | None) -> torch.Tensor:
        """(B, 1, S, S): causal within each document (and within `window` tokens back); bool for sdpa, additive
        for eager."""
        key = (inner, dtype, window)
        if key not in self._masks:
            pos = self.position_ids
            doc = (pos == 0).cumsum(-1)
            i = torch.arange(pos.shape[-1], device=pos.device)
            allowed = (doc[:, :, None] == doc[:, None, :]) & (i[None, :] <= i[:, None])
            if window:
                allowed &= i[None, :] > i[:, None] - window
            allowed = allowed[:, None]
            if inner == "eager":
                allowed = torch.zeros(allowed.shape, dtype=dtype, device=pos.device).masked_fill(
                    ~allowed, torch.finfo(dtype).min)
            self._masks[key] = allowed
        return self._masks[key]


def split(batch: dict, layout: Layout, *, flat: bool) -> tuple[dict, Rows]:
    """This rank's slice of a collated batch, and the whole rows. `flat`: the inner attention reads boundaries
    (flash-like), so rows are flattened into one. Labels become `shift_labels` (already shifted: what TRL's fused
    head and transformers' loss then score without shifting), also under `labels`, which the model's own loss
    needs to be given."""
    batch = dict(batch)
    ids = batch.pop("input_ids")
    mask = batch.pop("attention_mask", None)
    pos = batch.pop("position_ids", None)
    if pos is None:  # padded rows: real tokens count from 0, each padding token a document of its own
        if mask is not None:
            pos = ((mask.long().cumsum(-1) - 1).clamp(min=0) * mask.long())
        else:
            pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    labels = batch.pop("labels", None)
    shifted = batch.pop("shift_labels", None)
    if shifted is None and labels is not None:
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    given = {k: batch.pop(k) for k in BOUNDARY_KEYS if k in batch}
    if flat and ids.shape[0] > 1:
        ids, pos = ids.reshape(1, -1), pos.reshape(1, -1)
        shifted = shifted.reshape(1, -1) if shifted is not None else None
        given = {}  # the collator's boundaries were of other rows
    pad = (-ids.shape[1]) % layout.size
    if pad:  # padding tokens: position 0 each (a document of its own), no label
        ids = torch.nn.functional.pad(ids, (0, pad), value=0)
        pos = torch.nn.functional.pad(pos, (0, pad), value=0)
        shifted = torch.nn.functional.pad(shifted, (0, pad), value=-100) if shifted is not None else None
    rows = Rows(position_ids=pos)
    if flat:
        rows.boundaries = _boundaries(pos, given, pad)
    n = ids.shape[1] // layout.size
    piece = slice(layout.rank * n, (layout.rank + 1) * n)
    batch["input_ids"] = ids[:, piece].contiguous()
    batch["position_ids"] = pos[:, piece].contiguous()
    if shifted is not None:  # contiguous: transformers' loss views them flat
        batch["labels"] = batch["shift_labels"] = shifted[:, piece].contiguous()
    return batch, rows


def _boundaries(pos: torch.Tensor, given: dict, pad: int) -> dict:
    """cu_seq_lens of the one flattened row: the collator's (no device sync), with the padding as one more
    document, else found from the position_ids."""
    cu = given.get("cu_seq_lens_q")
    if cu is not None:
        longest = int(given.get("max_length_q") or 0)
        if pad:
            cu = torch.cat([cu, cu.new_tensor([int(cu[-1]) + pad])])
            longest = max(longest, pad)
    else:
        from sft_dist.model.varlen import cu_seq_lens

        cu, longest = cu_seq_lens(pos)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def inner_reads_boundaries() -> bool:
    """Whether the attention inside reads document boundaries (flash-like) rather than a mask: its rows are
    flattened into one."""
    return _STATE.inner in FLASH_LIKE


@contextlib.contextmanager
def active(rows: Rows):
    """The forward (and backward: activation checkpointing runs the attention again) of a split batch."""
    before = _STATE.rows
    _STATE.rows = rows
    try:
        yield
    finally:
        _STATE.rows = before


def mask_function(*args, **kwargs):
    """transformers' mask for `NAME`: none in a split forward (the attention builds the whole rows' own), else the
    inner implementation's."""
    if _STATE.rows is not None:
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS[_STATE.inner](*args, **kwargs)


def _inner_function(module):
    if _STATE.inner == "eager":  # each model's own (soft-capping, sinks ...), in its modeling module
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{KEY}: {type(module).__name__} has no eager_attention_forward; use sdpa")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[_STATE.inner]


class _Local:
    """The attention module as the inner attention sees this rank's heads: the k/v grouping after padding and
    repeats, and this rank's share of any learned per-head sinks (gpt-oss and the like)."""

    def __init__(self, module, heads: Heads, rank: int):
        self._module = module
        self.num_key_value_groups = heads.group_padded // heads.repeat
        sinks = getattr(module, "sinks", None)
        if isinstance(sinks, torch.Tensor):
            self.sinks = heads.per_head(sinks, rank)

    def __getattr__(self, name):
        return getattr(self._module, name)


def attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention interface: q (B, H, s, D), k/v (B, Hkv, s, D) of this rank's slice ->
    ((B, s, H, D), None)."""
    inner = _inner_function(module)
    rows = _STATE.rows
    if rows is None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    size, group, rank = _STATE.layout.size, _STATE.group, _STATE.layout.rank
    heads = Heads.of(query.shape[1], key.shape[1], size)
    if not heads.plain or isinstance(getattr(module, "sinks", None), torch.Tensor):
        module = _Local(module, heads, rank)
    if kwargs.get("s_aux") is not None:  # sinks as flash attention takes them
        kwargs["s_aux"] = heads.per_head(kwargs["s_aux"], rank)
    q = _to_heads(heads.query(query), size, group)
    k, v = (_to_heads(heads.key_value(x), size, group) for x in (key, value))
    if _STATE.inner in FLASH_LIKE:
        kwargs.update(rows.boundaries, position_ids=rows.position_ids.reshape(1, -1))
        mask = None
    else:
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        window = window if window and window < q.shape[2] else None
        if _STATE.inner == "flex_attention":
            mask = rows.block_mask(window)
        else:
            mask = rows.mask(_STATE.inner, q.dtype, window)
            kwargs["is_causal"] = False
    out, _ = inner(module, q, k, v, mask, **kwargs)
    return heads.output(_to_tokens(out, size, group)), None


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Equal splits along dim 0, differentiable (its backward is the reverse all-to-all): torch's functional
    collective (torch.distributed.nn's is deprecated since torch 2.13)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    return all_to_all_single_autograd(x.contiguous(), None, None, group)


def _to_heads(x: torch.Tensor, size: int, group) -> torch.Tensor:
    """(B, H, s, D) of this slice of tokens -> (B, H/size, size*s, D) of every token, this rank's heads."""
    b, h, s, d = x.shape
    y = _all_to_all(x.reshape(b, size, h // size, s, d).transpose(0, 1), group)  # (size: slices, B, H/size, s, D)
    return y.permute(1, 2, 0, 3, 4).reshape(b, h // size, size * s, d)


def _to_tokens(out: torch.Tensor, size: int, group) -> torch.Tensor:
    """(B, S, H/size, D) of every token, this rank's heads -> (B, S/size, H, D) of this rank's tokens."""
    b, t, h, d = out.shape
    s = t // size
    y = _all_to_all(out.reshape(b, size, s, h, d).transpose(0, 1), group)  # (size: head groups, B, s, H/size, D)
    return y.permute(1, 2, 0, 3, 4).reshape(b, s, size * h, d)

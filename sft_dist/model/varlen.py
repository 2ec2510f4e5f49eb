"""`varlen_attention`: packed documents attended one by one, with no mask built.

Registered with transformers as an attention implementation (any model class that takes flash attention takes
this one). The micro-batch arrives flattened into one row with its documents' boundaries (`cu_seq_lens_q`,
`max_length_q`, from `PackedCollator`), or as rows with a padding mask (each row's tokens unpadded), or as
plain rows. On CUDA the kernel is torch's own `torch.nn.attention.varlen.varlen_attn` (flash attention inside
torch: no flash-attn package, no compile); on other devices each document goes through `scaled_dot_product_
attention` alone, which computes the same thing and lets CPU tests check everything around the kernel.

Why: sdpa given packed rows needs a block-diagonal mask, which transformers materialises per micro-batch and
which sends torch to its slower masked kernels, with the k/v heads repeated; this path skips both.
"""

from __future__ import annotations

import functools
import inspect

import torch

NAME = "varlen_attention"
# The keys transformers' flash path also reads from a batch (FlashAttentionKwargs): they reach every attention
# call of the model through its forward's **kwargs.
BATCH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def register() -> None:
    """Make `NAME` an attention implementation transformers accepts (idempotent). Its mask function is the one
    flash attention uses: no mask for full rows, the 2D padding mask otherwise, never a 4D one."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    _KERNEL.update(kernel=torch_kernel())
    _KERNEL.update(params=frozenset(inspect.signature(_KERNEL["kernel"]).parameters) if _KERNEL["kernel"] else ())


# The kernel and its keyword arguments (they changed between torch 2.9 and 2.12), looked up once at register():
# not inside the forward, which torch.compile traces. `native_gqa`: a kernel without `enable_gqa` was seen to
# take fewer k/v heads than q heads as they are (`probe`); until then they are repeated.
_KERNEL: dict = {"kernel": None, "params": (), "native_gqa": False}


def torch_kernel():
    """torch's varlen flash attention, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


# flash kernels (torch's included) take head dims up to this
MAX_HEAD_DIM = 256


def head_layout(config) -> tuple[int, int]:
    """(head dim, query heads per k/v head) of a transformers config, as the probe should try them."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or 1
    head_dim = getattr(text, "head_dim", None) or (getattr(text, "hidden_size", 64 * heads) // heads)
    kv = getattr(text, "num_key_value_heads", None) or heads
    return int(head_dim), max(1, heads // kv)


def traits(config) -> tuple[float | None, bool, float]:
    """(logit soft-cap, learned sinks, attention dropout) of a transformers config's text model: what an
    attention kernel must also do (this one does none of them; flex attention the first two, model/flex.py)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "attn_logit_softcapping", None) or getattr(text, "final_attn_softcapping", None)
    return ((float(softcap) if softcap else None), getattr(text, "model_type", None) in ("gpt_oss",),
            float(getattr(text, "attention_dropout", 0.0) or 0.0))


def config_problem(config) -> str | None:
    """Why a model's attention cannot run here, from its transformers config; None when it can."""
    softcap, sinks, dropout = traits(config)
    if softcap:
        return "its attention uses logit soft-capping"
    if sinks:
        return "its attention uses learned sinks"
    if dropout > 0:
        return f"attention_dropout is {dropout}"
    v_dim = getattr(config, "v_head_dim", None)
    qk_dim = (getattr(config, "qk_nope_head_dim", None) or 0) + (getattr(config, "qk_rope_head_dim", None) or 0)
    if v_dim and qk_dim and v_dim != qk_dim:  # multi-head latent attention (DeepSeek V2/V3)
        return f"its query/key heads ({qk_dim}) and value heads ({v_dim}) differ in size"
    head_dim, _ = head_layout(config)
    if max(head_dim, qk_dim) > MAX_HEAD_DIM:
        return f"its head dim {max(head_dim, qk_dim)} is over the flash kernels' {MAX_HEAD_DIM}"
    return None


@functools.lru_cache(maxsize=None)
def kernel_problem(device_index: int, dtype: torch.dtype, head_dim: int = 64, groups: int = 2) -> str | None:
    """Run the CUDA kernel once on tiny packed inputs with the model's head dim and k/v grouping (forward and
    backward, two documents) against the per-document fp32 reference; None when it agrees, else why not (auto
    then falls back to sdpa)."""
    if torch_kernel() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    device = torch.device("cuda", device_index)
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"{torch.cuda.get_device_name(device)} is older than Ampere (flash attention needs sm80+)"
    why = probe(device, dtype, head_dim, groups)
    return f"{why} on this GPU (head dim {head_dim})" if why else None


def probe(device: torch.device, dtype: torch.dtype, head_dim: int, groups: int) -> str | None:
    """The kernel against the fp32 reference on `device`; None when they agree, else why not. Where the kernel's
    signature has no `enable_gqa` (torch 2.10/2.11), first with fewer k/v heads than q heads as they are (the
    flash kernel under it takes them: no repeated k/v to compute and keep for backward), else repeated."""
    if _KERNEL["kernel"] is None:
        register()
    if groups > 1 and "enable_gqa" not in _KERNEL["params"]:
        _KERNEL["native_gqa"] = True
        if _agreement(device, dtype, head_dim, groups) is None:
            return None
        _KERNEL["native_gqa"] = False
    return _agreement(device, dtype, head_dim, groups)


def _agreement(device, dtype, head_dim: int, groups: int) -> str | None:
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(19, h, head_dim, generator=gen).to(device, dtype).requires_grad_()
                   for h in (2 * groups, 2, 2))
        cu = torch.tensor([0, 7, 19], dtype=torch.int32, device=device)
        got = _on_cuda(q, k, v, cu, 12, scale=None, window=None)
        ref = _per_document(q.float(), k.float(), v.float(), cu, scale=None, window=None)  # fp32 reference
        grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        # each tensor's largest error relative to its largest value: 16-bit kernels stay well below 3%
        worst = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
                    for a, b in zip((got, *grads), (ref, *ref_grads)))
    except Exception as e:  # noqa: BLE001 - any failure means: do not pick it
        return f"torch's varlen_attn failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if not worst < 0.03:
        return f"torch's varlen_attn differs from the fp32 reference by {worst:.1%}"
    return None


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      sliding_window=None, softcap=None, **kwargs):
    """transformers' attention interface: q (B, Hq, T, D), k/v (B, Hkv, S, D) -> ((B, T, Hq, D), None)."""
    if softcap:
        raise RuntimeError(f"{NAME} cannot apply logit soft-capping ({type(module).__name__}); "
                           "set model.attn_implementation to eager")
    if kwargs.get("s_aux") is not None:
        raise RuntimeError(f"{NAME} cannot apply attention sinks ({type(module).__name__}); use eager or flash")
    if dropout:
        raise RuntimeError(f"{NAME} has no attention dropout (got {dropout}); set the model's attention_dropout "
                           "to 0 or use sdpa")
    b, hq, t, d = query.shape
    if key.shape[2] != t:  # decoding with a KV cache (evaluation samples): one new token at a time
        return _decode(query, key, value, attention_mask, scaling, window=sliding_window)
    window = sliding_window if sliding_window and sliding_window < t else None
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, T, H, D)
    index = None
    if attention_mask is not None and not bool(attention_mask.all()):  # padded rows: keep the real tokens
        keep = attention_mask.bool().reshape(-1)
        index = keep.nonzero().squeeze(1)
        lengths = attention_mask.bool().sum(1)
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        longest = int(lengths.max())
        q, k, v = (x.reshape(b * t, *x.shape[2:]).index_select(0, index) for x in (q, k, v))
    else:
        cu, longest = _boundaries(kwargs, b, t, query.device)
        q, k, v = (x.reshape(b * t, *x.shape[2:]) for x in (q, k, v))
    if query.device.type == "cuda":
        out = _on_cuda(q, k, v, cu, longest, scale=scaling, window=window)
    else:
        out = _per_document(q, k, v, cu, scale=scaling, window=window)
    if index is not None:
        out = out.new_zeros(b * t, hq, d).index_copy(0, index, out)
    return out.reshape(b, t, hq, d), None


def cu_seq_lens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The documents of a batch flattened row after row: a document starts where position_ids restart at 0 and
    at every row start. (cumulative lengths as int32, the longest document)."""
    b, t = position_ids.shape if position_ids.dim() == 2 else (1, position_ids.numel())
    starts = position_ids.reshape(-1) == 0
    starts[::t] = True
    cu = torch.nn.functional.pad(starts.nonzero().squeeze(1), (0, 1), value=b * t).to(torch.int32)
    return cu, int(cu.diff().max())


def _boundaries(kwargs, b: int, t: int, device) -> tuple[torch.Tensor, int]:
    """cu_seq_lens of the flattened batch: from the batch (the collator's, no device sync), else from the
    position_ids, else one document per row."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and int(cu.shape[0]) >= 2 and b == 1:
        return cu.to(device=device, dtype=torch.int32), int(kwargs.get("max_length_q") or t)
    positions = kwargs.get("position_ids")
    if positions is not None and positions.numel() == b * t:
        return cu_seq_lens(positions.reshape(b, t))
    return torch.arange(0, b * t + 1, t, dtype=torch.int32, device=device), t


def _on_cuda(q, k, v, cu, longest: int, *, scale, window):
    if _KERNEL["kernel"] is None:
        register()
    kernel, params = _KERNEL["kernel"], _KERNEL["params"]
    given = compute = q.dtype
    if compute == torch.float32:  # flash kernels compute in 16 bit: the autocast dtype, as sdpa would use
        compute = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = (x.to(compute) for x in (q, k, v))
    extra = {}
    if "enable_gqa" in params:
        extra["enable_gqa"] = q.shape[1] != k.shape[1]
    elif q.shape[1] != k.shape[1] and not _KERNEL["native_gqa"]:
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    if "window_size" in params:
        extra["window_size"] = (window - 1, 0) if window else (-1, 0)
    else:
        if window:
            raise RuntimeError(f"torch {torch.__version__}'s varlen_attn has no sliding window; use sdpa")
        extra["is_causal"] = True
    if scale is not None and "scale" in params:
        extra["scale"] = scale
    elif scale is not None and abs(scale * q.shape[-1] ** 0.5 - 1) > 1e-6:
        q = q * (scale * q.shape[-1] ** 0.5)  # a kernel without `scale` (torch 2.9/2.10) uses 1/sqrt(head dim)
    return kernel(q, k, v, cu, cu, longest, longest, **extra).to(given)


@torch.compiler.disable  # a Python loop over the batch's documents: run as is, not traced and recompiled per batch
def _per_document(q, k, v, cu, *, scale, window):
    """The reference: each document alone through sdpa (causal, optional sliding window). (T, H, D) layout."""
    out = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qd, kd, vd = (x[start:end].transpose(0, 1) for x in (q, k, v))
        mask = None
        if window:
            i = torch.arange(end - start, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        out.append(torch.nn.functional.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=mask, is_causal=mask is None, scale=scale,
            enable_gqa=qd.shape[0] != kd.shape[0]).transpose(0, 1))
    return torch.cat(out) if out else q.new_zeros(0, *q.shape[1:])


def _decode(query, key, value, attention_mask, scaling, *, window: int | None = None):
    """Queries that are the last tokens of longer keys (a KV cache): sdpa with the padding mask, the new
    token(s) attending to everything before them, or to the last `window` positions (a sliding-window layer whose
    cache keeps more than its window)."""
    t, s = query.shape[2], key.shape[2]
    mask = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)
    if window and window < s:
        mask &= ~torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t - window)
    if attention_mask is not None:
        mask = mask[None, None] & attention_mask.bool()[:, None, None, -s:]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None

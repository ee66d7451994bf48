"""Launcher of the decode attention: one query token per sequence against a static KV cache, each KV head read once.

    out = softmax(q Kᵀ · scale + mask) V        q [B, H, 1, D];  K, V [B, Hkv, L, D];  H = G · Hkv

Why a kernel of our own: in a decode step Hugging Face's sdpa path repeats K and V to all H heads (``repeat_kv``) and
Inductor lowers the call to cuDNN behind four copy kernels: ~15 µs per layer on an H100 for ~1 MB of cache
(docs/design.md, "Decode attention"). The kernel is ``decode_attention_triton.py``, the op ``ops.py``, the reference
``reference.py``, the tests tests/test_decode_attention.py, the rewrite passes/replace_decode_attention.py.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from torch import Tensor

from teal_fx.kernels import pdl
from teal_fx.kernels.triton_support import DTYPES, HAS_TRITON, interpreter_upcasts, next_pow2
from teal_fx.kernels.workspace import Workspace

if HAS_TRITON:
    from teal_fx.kernels import decode_attention_triton as jit

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


# ``acc``/``ml`` the partial softmax states of the splits (written before read), ``cnt`` the arrival counters
_WORKSPACE = Workspace("teal decode attention (reserve_workspace)",
                       dtypes={"acc": torch.float32, "ml": torch.float32, "cnt": torch.int32},
                       min_sizes={"acc": 1 << 16, "ml": 1 << 12, "cnt": 1 << 10})
_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the tests cover the merge
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


@dataclass(frozen=True)
class AttentionConfig:
    """How one decode attention launch is tiled: a (batch x KV heads) x nsplit grid."""

    group: int  # query heads per KV head (G)
    group_padded: int  # G padded to the tensor cores' 16 rows (GP)
    head_dim_padded: int  # D padded to a power of two >= 16 (DP)
    block_l: int  # cache positions per step
    l_per_split: int  # cache positions per program
    nsplit: int  # programs along the cache


def launch_config(batch: int, heads: int, kv_heads: int, length: int, head_dim: int,
                  device: torch.device) -> AttentionConfig:
    """Tile sizes and the split of the cache length: about two programs per SM, at least one block each."""
    G = heads // kv_heads
    DP = max(16, next_pow2(head_dim))
    block_l = 64 if DP <= 128 else 32
    return split_cache(AttentionConfig(G, max(16, next_pow2(G)), DP, block_l, 0, 0), length,
                       max(1, -(-2 * _sm_count(device) // (batch * kv_heads))))


def split_cache(cfg: AttentionConfig, length: int, splits: int, block_l: Optional[int] = None) -> AttentionConfig:
    """``cfg`` with the cache length cut into at most ``splits`` programs of whole ``block_l`` blocks."""
    block_l = block_l or cfg.block_l
    blocks = -(-length // block_l)
    per_split = -(-blocks // min(splits, blocks)) * block_l
    return replace(cfg, block_l=block_l, l_per_split=per_split, nsplit=-(-length // per_split))


def _workspace_sizes(cfg: AttentionConfig, batch: int, kv_heads: int) -> dict:
    slots = batch * kv_heads * cfg.nsplit
    return dict(acc=slots * cfg.group_padded * cfg.head_dim_padded, ml=slots * 2 * cfg.group_padded,
                cnt=batch * kv_heads)


def reserve_workspace(device: torch.device, batch: int, heads: int, kv_heads: int, length: int, head_dim: int) -> None:
    """Allocate the scratch for launches of this shape (call before a CUDA graph is captured)."""
    device = torch.device(device)
    cfg = launch_config(batch, heads, kv_heads, length, head_dim, device)
    _WORKSPACE.reserve(device, **_workspace_sizes(cfg, batch, kv_heads))


def supports(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> bool:
    """Shapes and dtypes the kernel takes (the op falls back to the reference otherwise)."""
    return (
        HAS_TRITON
        and q.is_cuda
        and q.dim() == 4 == k.dim() == v.dim()
        and q.shape[2] == 1
        and q.dtype in DTYPES
        and k.dtype == v.dtype == q.dtype
        and k.shape == v.shape
        and k.shape[0] == q.shape[0]
        and k.shape[3] == q.shape[3] <= MAX_HEAD_DIM
        and q.shape[1] % k.shape[1] == 0
        and _takes_mask(mask)
    )


def _takes_mask(mask: Optional[Tensor]) -> bool:
    """No mask, a boolean one, or an additive float one."""
    return mask is None or mask.dtype == torch.bool or mask.dtype.is_floating_point


def decode_attention_gpu(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                         config: Optional[AttentionConfig] = None, out: Optional[Tensor] = None) -> Tensor:
    """Launch the kernel (see ``supports``); ``mask`` broadcastable to [B, H, 1, L]; returns [B, H, 1, D]
    (into ``out`` if given). ``config`` overrides ``launch_config`` (tests use it to force splits)."""
    B, H, _, D = q.shape
    if out is None:
        out = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    return _launch(q, k, v, mask, scale, config, out, {})


def can_fold_qkv(head_dim: int, k_cache: Tensor, mask: Optional[Tensor]) -> bool:
    """Whether ``decode_attention_from_qkv_sums`` takes a cache of these heads (what ``supports`` takes, and heads
    of at least 16 columns, so a program's [G, D] tile has no padding columns for the norm's mean; the device is
    the caller's check)."""
    return (HAS_TRITON and 16 <= head_dim <= MAX_HEAD_DIM and k_cache.dim() == 4 and k_cache.shape[3] == head_dim
            and _takes_mask(mask))


def decode_attention_from_qkv_sums(sums: Sequence[Tensor], biases: Sequence[Optional[Tensor]], head_dim: int,
                                   cos: Tensor, sin: Tensor, cache_position: Tensor, k_cache: Tensor, v_cache: Tensor,
                                   q_norm: Optional[Tensor], k_norm: Optional[Tensor], norm_eps: float,
                                   mask: Optional[Tensor], scale: float,
                                   config: Optional[AttentionConfig] = None) -> Tensor:
    """The attention of a decode step whose q, k and v are the fp32 sums a q/k/v GEMV launch left in its workspace
    (``sums``: [B, N] views of one buffer's rows, q's, k's, v's; ``sparse_gemv.sparse_gemv_sums``): each program
    forms its G query heads (bias, Qwen3's q norm, RoPE with ``cos`` / ``sin`` [B or 1, 1, 1, D]), the program holding
    ``cache_position`` writes the new k and v row into the caches first, and the last program of each KV head zeroes
    the sums it read: the q/k/v + RoPE finishing launch (``sparse_gemv_qkv_rope``) folded in. Returns [B, H, 1, D]."""
    return _from_qkv_sums(sums, biases, head_dim, cos, sin, cache_position, k_cache, v_cache, q_norm, k_norm,
                          norm_eps, mask, scale, config)[0]


def _from_qkv_sums(sums, biases, head_dim, cos, sin, cache_position, k_cache, v_cache, q_norm, k_norm, norm_eps,
                   mask, scale, config, merge: bool = True) -> tuple[Tensor, AttentionConfig]:
    """The QKV_SUMS launch of the two functions above: (the output, written if ``merge``; the launch's config)."""
    q_sums, k_sums, v_sums = sums
    B, D = q_sums.shape[0], head_dim
    if not can_fold_qkv(D, k_cache, mask) or q_sums.shape[1] % D or k_sums.shape != v_sums.shape \
            or k_sums.shape[1] != k_cache.shape[1] * D or any(t.stride(1) != 1 or t.stride(0) != q_sums.stride(0)
                                                                for t in (k_sums, v_sums)):
        raise ValueError("decode_attention_from_qkv_sums: needs q/k/v sums of whole heads in one buffer's rows and "
                         "a cache of those heads (see can_fold_qkv)")
    H = q_sums.shape[1] // D
    out = torch.empty((B, H, 1, D), dtype=k_cache.dtype, device=k_cache.device)
    cfg = config or launch_config(B, H, k_cache.shape[1], k_cache.shape[2], D, k_cache.device)
    col = lambda t: (t.data_ptr() - q_sums.data_ptr()) // t.element_size()  # noqa: E731
    has_bias = biases[0] is not None
    fold = dict(QKV_SUMS=True, s_ptr=q_sums, stride_sum_b=q_sums.stride(0), K_COL0=col(k_sums), V_COL0=col(v_sums),
                bq_ptr=biases[0] if has_bias else q_sums, bk_ptr=biases[1] if has_bias else q_sums,
                bv_ptr=biases[2] if has_bias else q_sums, cos_ptr=cos, sin_ptr=sin,
                stride_cos_b=cos.stride(0) if cos.shape[0] > 1 else 0,
                stride_sin_b=sin.stride(0) if sin.shape[0] > 1 else 0, pos_ptr=cache_position.reshape(1),
                qn_ptr=q_norm if q_norm is not None else cos, kn_ptr=k_norm if k_norm is not None else cos,
                eps=float(norm_eps), HAS_BIAS=has_bias, HAS_NORM=q_norm is not None)
    return _launch(out, k_cache, v_cache, mask, scale, cfg, out, fold, merge), cfg


@dataclass(frozen=True)
class SplitStates:
    """The softmax states of a decode attention's cache splits, left unmerged (``split_states_from_qkv_sums``) for
    the next launch to merge as it reads its input (o's: ``sparse_gemv.sparse_gemv_merged_add_rmsnorm``):
    acc [slots, GP, DP] and ml [slots, 2, GP], slot (row · kv_heads + KV head) · nsplit + split."""

    acc: Tensor
    ml: Tensor
    rows: int
    kv_heads: int
    head_dim: int
    config: AttentionConfig
    dtype: torch.dtype  # the attention output's, which the merge rounds to


def split_states_from_qkv_sums(sums: Sequence[Tensor], biases: Sequence[Optional[Tensor]], head_dim: int,
                               cos: Tensor, sin: Tensor, cache_position: Tensor, k_cache: Tensor, v_cache: Tensor,
                               q_norm: Optional[Tensor], k_norm: Optional[Tensor], norm_eps: float,
                               mask: Optional[Tensor], scale: float,
                               config: Optional[AttentionConfig] = None) -> SplitStates:
    """``decode_attention_from_qkv_sums`` without its merge: each split stores its softmax state and nothing
    counts arrivals, so the merge's tail (a barrier, the counter's round trip, the last program's reads and store:
    2.0 of 5.4 µs a call in a chain on an H100, docs/perf-log.md v56) leaves the attention launch; the next launch
    merges (``store_merged_x``) and zeroes the q/k/v sums, which no program here zeroes. Takes a cache of at least
    two splits (``cache_splits``; with one the attention writes its output itself)."""
    out, cfg = _from_qkv_sums(sums, biases, head_dim, cos, sin, cache_position, k_cache, v_cache, q_norm, k_norm,
                              norm_eps, mask, scale, config, merge=False)
    B, HKV = out.shape[0], k_cache.shape[1]
    acc, ml, _ = _WORKSPACE.get(out.device, **_workspace_sizes(cfg, B, HKV))
    return SplitStates(acc, ml, B, HKV, head_dim, cfg, out.dtype)


def cache_splits(batch: int, heads: int, kv_heads: int, length: int, head_dim: int, device: torch.device) -> int:
    """How many programs the launch rule splits the cache among (1: no merge)."""
    return launch_config(batch, heads, kv_heads, length, head_dim, device).nsplit


def _launch(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
            config: Optional[AttentionConfig], out: Tensor, fold: dict, merge: bool = True) -> Tensor:
    """The kernel's grid; ``fold``: the QKV_SUMS arguments (``q`` is then only a shape, never read); ``merge``
    False: the splits' states are left unmerged (``out`` unwritten), a cache of two splits or more."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton decode attention needs triton")
    B, H, _, D = q.shape
    HKV, L = k.shape[1], k.shape[2]
    cfg = config or launch_config(B, H, HKV, L, D, q.device)
    if not merge and cfg.nsplit < 2:
        raise ValueError(f"the splits' states left unmerged take a cache of two splits or more: {cfg}")
    acc, ml, cnt = _WORKSPACE.get(q.device, **_workspace_sizes(cfg, B, HKV))
    if mask is not None:
        mask = mask.expand(B, H, 1, L)  # stride 0 along broadcast dims
        kind = 1 if mask.dtype == torch.bool else 2
        m_strides = (mask.stride(0), mask.stride(1), mask.stride(3))
    else:
        mask, kind, m_strides = q, 0, (0, 0, 0)
    use_pdl = pdl.enabled(q.device)
    jit.decode_attention_kernel[(B * HKV, cfg.nsplit)](
        q, k, v, mask, out, acc, ml, cnt,
        L, cfg.l_per_split, HKV, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        *m_strides,
        out.stride(0), out.stride(1), out.stride(3),
        G=cfg.group, GP=cfg.group_padded, D=D, DP=cfg.head_dim_padded, BLOCK_L=cfg.block_l, NSPLIT=cfg.nsplit,
        MASK=kind,
        MASK_ROW=m_strides[1] == 0 or H == 1, IEEE=q.dtype == torch.float32,
        UPCAST=interpreter_upcasts(q.dtype),
        PDL=use_pdl, MERGE=merge, num_warps=4, num_stages=2, **fold, **({"launch_pdl": True} if use_pdl else {}),
    )
    return out


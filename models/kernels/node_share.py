"""One expert node's share of a micro-batch, written where that node reads it, in one kernel:
every row, and for each (token, top-k slot) the expert's local id on that node, or -1 where
another node serves the slot or the row is padding, and its weight, or 0 there.

An attention node on the device lane does this for each expert node, each layer and each
micro-batch, straight into the node's dispatch slot. As torch ops it is about a dozen small
kernels (the holder lookups, two masks, two `where`s, three copies with their casts), each a
launch of its own inside the step's CUDA graph; the data is a few hundred KiB at most, so
what the step pays for is the launches (bench/NOTES.md, session 10).

Holder tables as `ExpertPlacement.holders` makes them: row t of expert e goes to holder
t mod count[e].

Shape legend: T = tokens, D = hidden, K = top-k, E = experts, H = holders per expert.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from afd.models.kernels import launching

BLOCK_T = 16
BLOCK_D = 512


@triton.jit(do_not_specialize=["T", "D", "x_stride", "H", "node"])
def _node_share_kernel(
    x_ptr,  # [T, D], rows `x_stride` apart
    ids_ptr,  # [T, K] global expert ids
    weights_ptr,  # [T, K]
    node_ptr,  # [E, H] holder node of each expert
    local_ptr,  # [E, H] the expert's id on that node
    count_ptr,  # [E] live holders
    real_ptr,  # [1] rows that are sequences (the rest: padding)
    rows_out_ptr,  # [T, D] contiguous
    ids_out_ptr,  # [T, K] contiguous
    weights_out_ptr,  # [T, K] contiguous
    T,
    D,
    x_stride,
    H,
    node,
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    in_td = (t < T)[:, None] & (d < D)[None, :]
    row = tl.load(x_ptr + t[:, None].to(tl.int64) * x_stride + d[None, :], mask=in_td)
    out = rows_out_ptr + t[:, None].to(tl.int64) * D + d[None, :]
    tl.store(out, row.to(rows_out_ptr.dtype.element_ty), mask=in_td)
    if tl.program_id(1) == 0:  # one column of programs writes the ids and weights
        k = tl.arange(0, BLOCK_K)
        in_tk = (t < T)[:, None] & (k < K)[None, :]
        at_tk = t[:, None] * K + k[None, :]
        e = tl.load(ids_ptr + at_tk, mask=in_tk, other=0)
        count = tl.load(count_ptr + e, mask=in_tk, other=1)
        holder = e * H + t[:, None] % count
        on = tl.load(node_ptr + holder, mask=in_tk, other=-1) == node
        on = on & (t < tl.load(real_ptr))[:, None]
        local = tl.load(local_ptr + holder, mask=in_tk, other=-1)
        weight = tl.load(weights_ptr + at_tk, mask=in_tk, other=0.0)
        ids_out = tl.where(on, local, -1).to(ids_out_ptr.dtype.element_ty)
        tl.store(ids_out_ptr + at_tk, ids_out, mask=in_tk)
        weights_out = tl.where(on, weight, 0.0).to(weights_out_ptr.dtype.element_ty)
        tl.store(weights_out_ptr + at_tk, weights_out, mask=in_tk)


def write_node_share(
    x_TD: torch.Tensor,
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    holders: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    real_1: torch.Tensor,
    node: int,
    rows_out_TD: torch.Tensor,
    ids_out_TK: torch.Tensor,
    weights_out_TK: torch.Tensor,
) -> None:
    """Writes node `node`'s share of the rows into the three outputs (casting to their
    dtypes). `holders`: ([E, H] node, [E, H] local id, [E] count); `real_1`: how many of the
    T rows are sequences, on the device (read in stream order)."""
    T, D = x_TD.shape
    K = ids_TK.shape[1]
    node_EH, local_EH, count_E = holders
    for name, t in (("rows", rows_out_TD), ("ids", ids_out_TK), ("weights", weights_out_TK)):
        if not t.is_contiguous() or t.shape[0] != T:
            raise ValueError(f"the {name} output must be [{T}, ...] and contiguous")
    if T == 0:
        return
    if x_TD.stride(1) != 1:
        x_TD = x_TD.contiguous()
    with launching():
        _node_share_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))](
            x_TD,
            ids_TK.contiguous(),
            weights_TK.contiguous(),
            node_EH.contiguous(),  # (rows of H: the kernel indexes e * H + pick)
            local_EH.contiguous(),
            count_E,
            real_1,
            rows_out_TD,
            ids_out_TK,
            weights_out_TK,
            T,
            D,
            x_TD.stride(0),
            node_EH.shape[1],
            node,
            K=K,
            BLOCK_K=triton.next_power_of_2(K),
            BT=BLOCK_T,
            BD=BLOCK_D,
        )

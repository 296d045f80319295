"""Separable linear resampling (``out = Ay @ low @ Ax^T``) in banded form, for compiled code.

A bilinear resize, or a chain of them such as ``Sam.postprocess_masks``, maps each output row (column) to a few
consecutive input rows (columns): its matrix is banded. Two dense matrix products compute it in the fewest eager
ops, but a compiler keeps matrix products as library kernels whose outputs go through memory. Written as gathers
of the few input taps and weighted sums, the same map is element-wise work that ``torch.compile`` fuses into the
kernel that consumes it (a threshold count, a crop), so the full-resolution values are never written.
:func:`band` turns a matrix into that form (exactly: the weights are the matrix's own entries), and
:func:`banded_resample` applies it (its row pass ``[N, R, w]`` may still be stored by the compiler);
:func:`banded_taps` writes each output directly from its ``K x K`` input taps, in the same order of sums, so that
nothing but the consumer's result is stored. The results equal the dense products up to float32 rounding (the sums
run over the band only, in another order).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Taps per output row in the band: two bilinear resizes of scale 4 (SAM's 256 -> 1024) then any scale touch at most
#: three consecutive input rows (two neighbours 1/4 apart, two taps each).
BAND = 3


def band(matrix: "torch.Tensor", width: int = BAND) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The band of a ``[rows, n]`` matrix whose every row's non-zero entries lie within ``width`` consecutive
    columns: int64 ``[rows, width]`` column indices (``start .. start + width - 1``, inside ``[0, n)``) and the
    matrix's entries there, same dtype (zeros where the band runs past a row's non-zeros). No host sync.

    Raises:
        ValueError: ``n < width``.
    """
    import torch

    n = matrix.shape[1]
    if n < width:
        raise ValueError(f"a band of {width} columns needs at least {width} columns, got {n}")
    first = (matrix != 0).to(torch.uint8).argmax(dim=1)  # first non-zero column (0 for an all-zero row)
    start = first.clamp(max=n - width)
    index = start[:, None] + torch.arange(width, device=matrix.device)
    return index, matrix.gather(1, index)


def banded_resample(
    low: "torch.Tensor",
    rows: tuple["torch.Tensor", "torch.Tensor"],
    cols: tuple["torch.Tensor", "torch.Tensor"],
) -> "torch.Tensor":
    """``Ay @ low[i] @ Ax^T`` for every ``i`` from the bands of ``Ay`` and ``Ax``, float32 ``[N, R, Q]``.

    Args:
        low: ``[N, h, w]`` (any float dtype).
        rows: :func:`band` of ``Ay`` (``[R, K]`` indices into ``h`` and weights), or per item ``[N, R, K]``.
        cols: :func:`band` of ``Ax`` (``[Q, K]`` indices into ``w`` and weights), or per item ``[N, Q, K]``.
    """
    import torch

    n = low.shape[0]
    (ri, rw), (ci, cw) = rows, cols
    ri, rw = ri.expand(n, *ri.shape[-2:]), rw.expand(n, *rw.shape[-2:])  # [N, R, K]
    ci, cw = ci.expand(n, *ci.shape[-2:]), cw.expand(n, *cw.shape[-2:])  # [N, Q, K]
    item = torch.arange(n, device=low.device)
    low = low.to(torch.float32)
    across = sum(rw[:, :, k, None] * low[item[:, None], ri[:, :, k]] for k in range(ri.shape[-1]))  # [N, R, w]
    r = torch.arange(across.shape[1], device=low.device)
    return sum(
        cw[:, None, :, k] * across[item[:, None, None], r[None, :, None], ci[:, None, :, k]]
        for k in range(ci.shape[-1])
    )


def banded_taps(
    low: "torch.Tensor",
    rows: tuple["torch.Tensor", "torch.Tensor"],
    cols: tuple["torch.Tensor", "torch.Tensor"],
    *,
    transposed: bool = False,
) -> "torch.Tensor":
    """:func:`banded_resample` with bands shared by every item, written as one element-wise expression of the
    low-resolution taps: ``out[i, y, x] = sum_kc cw[x, kc] * sum_kr rw[y, kr] * low[i, ri[y, kr], ci[x, kc]]``,
    float32 ``[N, R, Q]`` (``transposed``: the same values as ``[N, Q, R]``, indexed ``[i, x, y]``).

    The sums run in :func:`banded_resample`'s order (rows first, then columns), so the values are its own. There is
    no row-pass intermediate: compiled, the expression inlines into the kernel that consumes it (a reduction), which
    reads only ``low`` and the bands. The transposed form is a different graph of the same values, so that a second
    reduction (along the other axis) recomputes them instead of sharing a realized buffer with the first.

    Args:
        low: ``[N, h, w]`` (any float dtype).
        rows: :func:`band` of ``Ay``: ``[R, K]`` indices into ``h`` and float32 weights.
        cols: :func:`band` of ``Ax``: ``[Q, K]`` indices into ``w`` and float32 weights.
    """
    import torch

    (ri, rw), (ci, cw) = rows, cols
    terms = []
    for kc in range(ci.shape[-1]):
        if transposed:  # [N, Q, R]
            across = sum(
                rw[None, :, kr] * low[:, ri[None, :, kr], ci[:, kc, None]].to(torch.float32)
                for kr in range(ri.shape[-1])
            )
            terms.append(cw[:, kc, None] * across)
        else:  # [N, R, Q]
            across = sum(
                rw[:, kr, None] * low[:, ri[:, kr, None], ci[None, :, kc]].to(torch.float32)
                for kr in range(ri.shape[-1])
            )
            terms.append(cw[None, :, kc] * across)
    return sum(terms)

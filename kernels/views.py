"""Tile views written as access patterns (``NkiTensor.ap``), which every NKI release we target accepts.

NKI 0.5 added view primitives (``broadcast``, ``expand_dim``, ``permute``, ``reshape_dim``; release notes 0.5.0 "New
NkiTensor view primitives"); the contest harness compiles with NKI 0.3 (Neuron SDK 2.29), which has only ``ap``,
``reshape`` and ``view``. The same views as patterns: nki-library at tag 2.29 (written for NKI 0.3) broadcasts with
a step-0 pattern the same way (``attention_cte.py``: ``.ap(pattern=[[1, sb_p], [0, d]], offset=0)``). An SBUF
pattern's partition step is the tile's free size (nki-language-guide.rst), so these take whole allocations, not
slices of their free dims.
"""

from .limits import PMAX


def free_size(tile) -> int:
    """Elements per partition of a whole SBUF tile ``[P, f1, ..., fk]``."""
    n = 1
    for d in tile.shape[1:]:
        n = n * d
    return n


def sbuf_view(tile, free, offset: int = 0, partitions: int = 0):
    """The whole SBUF ``tile`` (partitions ``0 .. partitions``, all by default) seen through ``free``, a list of
    ``[step, count]`` pairs in elements from ``offset`` (step 0 repeats: a broadcast)."""
    rows = partitions if partitions else tile.shape[0]
    return tile.ap([[free_size(tile), rows]] + free, offset=offset)


def rows_over_partitions(t, r0: int, n: int, parts: int = PMAX):
    """HBM rows ``r0 .. r0 + n`` of ``t [T, H]`` as ``[parts, n, H / parts]``: partition p holds elements
    ``p * F .. p * F + F - 1`` of every row (F = H / parts)."""
    H = t.shape[1]
    F = H // parts
    return t.ap([[F, parts], [H, n], [1, F]], offset=r0 * H)

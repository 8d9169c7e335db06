"""Launch grids: a kernel launched as ``kernel[g]`` runs g programs, one per physical NeuronCore of a logical core
(LNC=2 on trn2: g = 2; research/nki.md 3.1). Each program sees the same arguments; ``nl.program_id(0)`` tells it
which share of the work is its own. Shared-HBM outputs are one tensor for all programs; SBUF and PSUM are each
program's own, so partial results meet through ``nisa.sendrecv`` or shared HBM and a ``nisa.core_barrier``.
Without a grid (one program) every helper here is the identity.
"""

import nki.isa as nisa
import nki.language as nl


def program_share(n: int) -> tuple[int, int]:
    """``[first, last)``: this program's contiguous share of ``n`` work items, ``ceil(n / programs)`` each (the last
    program may get fewer or none); ``(0, n)`` without a grid."""
    programs, pid = nl.num_programs(), nl.program_id(0)
    share = -(-n // programs)
    return min(n, pid * share), min(n, (pid + 1) * share)


def sum_over_programs(acc) -> None:
    """acc [P, ...] fp32 SBUF = the sum of every program's ``acc`` (LNC=2: one ``sendrecv`` of the partner's tile
    over the cores' DMA, then program 0's + program 1's, the same order on both cores so both hold equal sums).
    No-op without a grid."""
    programs, pid = nl.num_programs(), nl.program_id(0)
    if programs == 1:
        return
    other = nl.ndarray(acc.shape, dtype=acc.dtype, buffer=nl.sbuf)
    nisa.sendrecv(src=acc, dst=other, send_to_rank=1 - pid, recv_from_rank=1 - pid, pipe_id=0)
    first, second = (acc, other) if pid == 0 else (other, acc)
    nisa.tensor_tensor(dst=acc, data1=first, data2=second, op=nl.add)

"""``nki.collectives``: in-kernel collectives across the ranks (logical NeuronCores) of a replica group.

Implemented: ``ReplicaGroup``, ``all_reduce`` and ``rank_id``, with the rules of AWS's API reference
(aws-neuron-sdk ``nki/api/nki/collectives/__init__.py``): ``srcs``/``dsts`` are lists of tensors, all in HBM or all
in SBUF (no mixing), several tensors (coalesced) only in HBM; ``op`` is ``nl.add``, ``nl.minimum`` or ``nl.maximum``;
``priority`` (0-3) exists on NeuronCore-v4+ only. The other collectives of that module raise a clear error here.

Ranks. A kernel launched by ``emulator.run`` is rank 0 of a one-rank world; ``run_ranks`` runs one launch per rank
concurrently (a thread each, as the programs of an LNC=2 launch already are), and ``solo_rank(n)`` runs a launch as
rank 0 of ``n`` ranks whose others contribute the reduction's identity (the collective's time for ``n`` ranks, the
values of this rank alone: for costing one rank's kernel).

What the emulator assumes where AWS documents nothing: under LNC=2 each program (physical core) takes part in its
own collective with the same program of the other ranks, on its own data, as nki-library's ``transformer_tkg``
uses SBUF all-reduces (each core reduces its shard, then the cores exchange shards with ``sendrecv``); a reduction
is computed in fp32 over the ranks in rank order and rounded once to the destination's dtype.

Time: the collective model of AWS's intra-node collectives note (``all_reduce_seconds``): the destination is ready
that long after the last rank's source is; the transfer uses this core's DMA bandwidth but no DMA queue (collectives
run on their own rings) and no compute engine.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Callable, Sequence

import numpy as np

from . import context, targets
from .errors import NkiEmulatorError, check
from .language import NKIObject
from .tensor import HBM, MemoryRegion, NkiTensor

# neuron-runtime/explore/intranode-collective-comm.rst (aws-neuron-sdk): "the per-hop latency of Ring/KangaRing is
# about 1-2 us (HBM load dependent)"; Mesh (one hop per phase) is the algorithm below 1 MB, RDH (log2 N hops per
# phase) for 1-56 MB; AllReduce = ReduceScatter + AllGather. Decode steps keep HBM loaded: the loaded end is taken.
COLLECTIVE_HOP_SECONDS = 2e-6
MESH_MAX_BYTES = 1 << 20

_REDUCE_OPS = ("add", "minimum", "maximum")


def all_reduce_seconds(nbytes: int, ranks: int, cores: int = 1) -> float:
    """One all-reduce of ``nbytes`` over ``ranks`` ranks: hops x per-hop latency + each rank's traffic (about
    2 (ranks - 1) / ranks of the buffer read and written, the bandwidth-optimal volume) through ``cores`` physical
    cores' HBM bandwidth. Zero for one rank."""
    if ranks <= 1:
        return 0.0
    return all_reduce_latency(nbytes, ranks) + all_reduce_transfer_seconds(nbytes, ranks, cores)


def all_reduce_latency(nbytes: int, ranks: int) -> float:
    """The hop latency of an all-reduce: Mesh below 1 MB (one hop for the ReduceScatter, one for the AllGather), RDH
    above (log2(ranks) hops per phase)."""
    if ranks <= 1:
        return 0.0
    hops = 2 if nbytes < MESH_MAX_BYTES else 2 * math.ceil(math.log2(ranks))
    return hops * COLLECTIVE_HOP_SECONDS


def all_reduce_transfer_seconds(nbytes: int, ranks: int, cores: int = 1) -> float:
    if ranks <= 1:
        return 0.0
    volume = 2 * (ranks - 1) / ranks * nbytes
    return 2 * volume / (targets.current().hbm_bytes_per_s_per_core * cores)


class ReplicaGroup(NKIObject):
    """The ranks that take part in a collective: disjoint sub-groups, each a list of rank ids (API reference:
    "Sub-groups represented by lists of ranks should not have any overlap"); a rank reduces with its sub-group."""

    def __init__(self, replica_groups: Sequence[Sequence[int]]) -> None:
        where = "nki.collectives.ReplicaGroup"
        groups = [list(g) for g in replica_groups] if isinstance(replica_groups, (list, tuple)) else None
        check(
            groups and all(g and all(isinstance(r, int) and r >= 0 for r in g) for g in groups),
            where,
            f"replica_groups={replica_groups!r}; must be a non-empty list of non-empty lists of rank ids (ints >= 0)",
        )
        seen: set[int] = set()
        for g in groups:
            check(not (set(g) & seen) and len(set(g)) == len(g), where, f"replica_groups={groups}; sub-groups overlap")
            seen |= set(g)
        self.replica_groups = groups

    def members(self, rank: int, where: str) -> list[int]:
        for g in self.replica_groups:
            if rank in g:
                return sorted(g)
        groups = self.replica_groups
        raise NkiEmulatorError(f"{where}: replica_group={groups}; rank {rank} is in none of its sub-groups")

    def __repr__(self) -> str:
        return f"ReplicaGroup({self.replica_groups})"


class World:
    """The ranks of one emulated run: where their collectives meet. ``solo``: only rank 0 runs; the other ranks'
    contributions are the reduction's identity and arrive when rank 0's does."""

    def __init__(self, ranks: int, solo: bool = False) -> None:
        if ranks < 1:
            raise ValueError(f"ranks={ranks}; must be >= 1")
        self.ranks = ranks
        self.solo = solo
        self.cond = threading.Condition()
        self.posts: dict[tuple, dict[int, Any]] = {}
        self.failed = False
        self.finished: set[int] = set()

    def exchange(self, key: tuple, rank: int, members: list[int], payload: Any, where: str) -> dict[int, Any]:
        """Post ``payload`` under ``key`` and wait until every member posted; returns the posts by rank."""
        if self.solo:
            return {rank: payload}
        with self.cond:
            posts = self.posts.setdefault(key, {})
            posts[rank] = payload
            self.cond.notify_all()
            while len(posts) < len(members):
                if self.failed:
                    raise context.PartnerFailed(f"{where}: rank {rank} waited for a rank that failed")
                missing = [r for r in members if r not in posts and r in self.finished]
                if missing:
                    raise NkiEmulatorError(
                        f"{where}: rank {rank} waits for rank(s) {missing}, which finished without reaching this "
                        "collective; on hardware the ranks would wait forever (deadlock)"
                    )
                self.cond.wait()
            return dict(posts)

    def abort(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()

    def rank_done(self, rank: int) -> None:
        with self.cond:
            self.finished.add(rank)
            self.cond.notify_all()


_local = threading.local()


def current_rank() -> tuple[World | None, int]:
    """The world and rank id of the launch being started in this thread (None, 0: a one-rank run)."""
    return getattr(_local, "world", None), getattr(_local, "rank", 0)


@contextlib.contextmanager
def as_rank(world: World | None, rank: int):
    """Launches started in this thread inside the block run as ``rank`` of ``world``."""
    prev = current_rank()
    _local.world, _local.rank = world, rank
    try:
        yield
    finally:
        _local.world, _local.rank = prev


@contextlib.contextmanager
def solo_rank(ranks: int):
    """Launches inside the block run as rank 0 of ``ranks`` ranks, the others contributing the identity: each
    collective costs what it would over ``ranks`` ranks and returns this rank's own values (for costing one rank)."""
    with as_rank(World(ranks, solo=True), 0):
        yield


def run_ranks(run: Callable, kernel, args_per_rank: Sequence[Sequence], kwargs_per_rank=None) -> list:
    """``run(kernel, *args_per_rank[r], **kwargs_per_rank[r])`` for every rank r at once, a thread each, so that their
    collectives meet; returns the ranks' results in rank order, or raises the first real failure."""
    n = len(args_per_rank)
    if n < 1:
        raise ValueError("args_per_rank: one argument tuple per rank, at least one")
    kwargs_per_rank = kwargs_per_rank or [{}] * n
    world = World(n)
    results: list[Any] = [None] * n

    def one(rank: int) -> None:
        try:
            with as_rank(world, rank):
                results[rank] = run(kernel, *args_per_rank[rank], **kwargs_per_rank[rank])
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            results[rank] = e
            world.abort()
        finally:
            world.rank_done(rank)

    threads = [threading.Thread(target=one, args=(r,), name=f"rank {r}", daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        real = [e for e in errors if not isinstance(e, context.PartnerFailed)]
        raise (real or errors)[0]
    return results


# ----- the kernel-side API ---------------------------------------------------------------------------------------
def rank_id(name: str | None = None) -> int:
    """The current rank's id within the collective world."""
    launch = context.current().launch
    return 0 if launch is None else launch.rank


def _tensors(ts, where: str, what: str) -> list[NkiTensor]:
    check(
        isinstance(ts, (list, tuple)) and ts and all(isinstance(t, NkiTensor) for t in ts),
        where,
        f"{what}={ts!r}; must be a non-empty list of tensors",
    )
    return list(ts)


def all_reduce(srcs, dsts, replica_group, op, priority=None, name=None) -> None:
    """dsts[i] = op over the replica sub-group's ranks of their srcs[i] (API reference ``all_reduce``)."""
    where = "nki.collectives.all_reduce"
    srcs, dsts = _tensors(srcs, where, "srcs"), _tensors(dsts, where, "dsts")
    check(len(srcs) == len(dsts), where, f"{len(srcs)} srcs and {len(dsts)} dsts; must pair up")
    check(
        isinstance(replica_group, ReplicaGroup),
        where,
        f"replica_group={replica_group!r}; must be an nki.collectives.ReplicaGroup",
    )
    op_name = getattr(op, "name", None)
    check(op_name in _REDUCE_OPS, where, f"op={op_name or op!r}; must be nl.add, nl.minimum or nl.maximum")
    check(
        priority is None or targets.current().core not in ("NeuronCore-v2", "NeuronCore-v3"),
        where,
        f"priority={priority}; DMA priority exists on NeuronCore-v4+ only (target {targets.current().name})",
    )
    check(priority is None or priority in (0, 1, 2, 3), where, f"priority={priority}; must be 0-3")
    in_hbm = [t.buffer in HBM for t in srcs + dsts]
    in_sbuf = [t.buffer is MemoryRegion.sbuf for t in srcs + dsts]
    check(
        all(in_hbm) or all(in_sbuf),
        where,
        "tensors in " + ", ".join(sorted({t.buffer.name for t in srcs + dsts})) + "; all must be in HBM or all in SBUF",
    )
    check(
        len(srcs) == 1 or all(in_hbm),
        where,
        f"{len(srcs)} tensors in SBUF; coalesced collectives (several tensors) need HBM tensors",
    )
    for i, (s, d) in enumerate(zip(srcs, dsts)):
        check(
            s.shape == d.shape and s.dtype == d.dtype,
            where,
            f"srcs[{i}]={s.describe()}, dsts[{i}]={d.describe()}; must have the same shape and dtype",
        )
    ctx = context.current()
    launch = ctx.launch
    world, rank = (None, 0) if launch is None else (launch.world, launch.rank)
    ranks = 1 if world is None else world.ranks
    members = replica_group.members(rank, where)
    check(
        max(members) < ranks,
        where,
        f"replica group {members} needs ranks up to {max(members)}; this launch is rank {rank} of {ranks} "
        "(run the ranks with emulator.run_ranks, or emulator.solo_rank(n) to cost one)",
    )
    seq = ctx.collective_seq
    ctx.collective_seq += 1
    values = [s.read_raw().astype(np.float32) for s in srcs]
    ready = max(ctx.cost.timeline.ready_of(s._storage) for s in srcs)
    signature = (tuple(members), op_name, tuple((tuple(s.shape), s.dtype.name) for s in srcs))
    if len(members) == 1:
        posts = {rank: (signature, values, ready)}
    else:
        key = ("all_reduce", ctx.program_id, seq, tuple(members))
        posts = world.exchange(key, rank, members, (signature, values, ready), where)
    for r, (sig, _, _) in posts.items():
        check(
            sig == signature,
            where,
            f"rank {r} called it with (group, op, srcs)={sig}, rank {rank} with {signature}; the ranks must agree",
        )
    fn = {"add": np.add, "minimum": np.minimum, "maximum": np.maximum}[op_name]
    identity = {"add": 0.0, "minimum": np.inf, "maximum": -np.inf}[op_name]
    for i, d in enumerate(dsts):
        acc = None
        for r in members:  # rank order, on every rank the same
            v = posts[r][1][i] if r in posts else np.full(values[i].shape, identity, dtype=np.float32)
            acc = v.copy() if acc is None else fn(acc, v)
        d.write_raw(acc.reshape(d.shape).astype(d.dtype))
    start = max(p[2] for p in posts.values())
    nbytes = sum(s.size * s.dtype.itemsize for s in srcs)
    hbm = nbytes if all(in_hbm) else 0
    ctx.cost.collective(
        "all_reduce",
        nbytes,
        2 * hbm,
        all_reduce_latency(nbytes, len(members)),
        all_reduce_transfer_seconds(nbytes, len(members)),
        after=start,
    )


def _not_emulated(name: str) -> Callable:
    def collective(*args, **kwargs):
        raise NkiEmulatorError(f"nki.collectives.{name}: not implemented by the emulator (all_reduce and rank_id are)")

    collective.__name__ = name
    return collective


for _name in (
    "all_gather",
    "all_gather_v",
    "reduce_scatter",
    "all_to_all",
    "all_to_all_v",
    "collective_permute",
    "collective_permute_implicit",
    "collective_permute_implicit_reduce",
    "collective_permute_implicit_current_processing_rank_id",
):
    globals()[_name] = _not_emulated(_name)

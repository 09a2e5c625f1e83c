"""Tuning profiles: the constants that make a search fast on one kind of device, apart from the
algorithm that uses them.

>>> from iqdb.kernels import CPU_PROFILE, GPU_PROFILE
>>> CPU_PROFILE.max_block, GPU_PROFILE.max_block
(1000, 1024)
>>> GPU_PROFILE.tile_bytes(16 << 20, free=40 << 30) == 1 << 30  # an eighth of free, at most 1 GiB
True
>>> CPU_PROFILE.tile_bytes(16 << 20, free=40 << 30) == 16 << 20  # the CPU keeps the working set
True

A profile only moves time and memory, never an answer: every value here may change without
changing a single result bit (the tests run each driver under both profiles and under one of
tiny tiles, and compare). Values that a result depends on (the float32 unit roundoff, the norm
range in which float32 products are safe, the select-k kernel's buckets and padding) are part
of the algorithm's proof or contract and stay literals in their modules.

Each backend carries one (:attr:`~iqdb.kernels.ArrayBackend.profile`): ``cpu_backend()`` the
:data:`CPU_PROFILE`, ``gpu_backend()`` the :data:`GPU_PROFILE`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["CPU_PROFILE", "DEFAULT_WORKING_SET", "GPU_PROFILE", "Profile"]


@dataclass(frozen=True, slots=True)
class Profile:
    """The tuning constants of the flat top-k drivers (:func:`~iqdb.kernels.flat_topk`,
    :func:`~iqdb.kernels.fixed_topk`) for one kind of device.

    The defaults are the CPU's, measured on the 2-vCPU guest iqdb was tuned on unless a field
    says otherwise (``bench/bench_search.py`` reruns the measurements).

    Attributes
    ----------
    working_set
        Bytes of score tiles a search holds at once (all workers together) when the caller names
        none. Bigger tiles mean fewer passes of per-tile work (selection merges, kernel launches)
        against more memory and, on a CPU, tiles falling out of the caches.
    free_memory_divisor
        ``None``: a search's tiles take exactly the caller's working set (the CPU, whose caches
        decide). ``N``: they may take up to ``1/N`` of the device's free memory, at most
        :attr:`max_tile_bytes`, never less than the caller's working set (see
        :meth:`tile_bytes`), so that a search runs few, large tiles: each tile costs kernel
        launches, and the host never waits per tile.
    max_tile_bytes
        The cap of that rule (ignored when :attr:`free_memory_divisor` is ``None``).
    max_block
        Queries per block at most: the product's efficiency grows with the block, its tiles and
        selection buffers with it. On the CPU 1,000, not 1,024: blocks of (or just under) a power
        of two run slower, their transposed score tiles' rows sitting about 2^k floats apart in
        the caches (1,000,000 x 128, k = 10, ms per query: 1,024 -> 1.67, 1,023 -> 1.67, 1,020 ->
        1.52, 1,000 -> 1.50; 512 -> 1.57 against 500 -> 1.50).
    min_tile_rows
        Rows per tile at least, whatever the working set and the block (a tile too thin pays its
        fixed per-tile cost for little work).
    tile_per_candidate
        Rows of a tile per candidate kept when every tile is merged into the running selection
        (small ``c``): a tile holds several times the ``c = k + margin`` candidates each query
        keeps, or merging would cost more than the product (so k = 50 -> 464 rows).
    margin
        Extra candidates kept per query beyond ``k``: more rows re-scored exactly, against fewer
        queries whose near-ties at the ``k``-th place send them to a re-scan. A count only: the
        re-scan keeps any value exact (0 re-scans every query).
    transpose_min
        Queries per block from which score tiles are laid out ``(rows, queries)``: a query's
        threshold then lines up with the contiguous axis (in NumPy, an operand broadcast along
        the contiguous axis takes a loop about 3.5x slower, measured on a 1,024 x 3,840 tile).
    augment_min
        Queries per block from which a per-tile copy of the rows with the norm appended (L2) or
        scaled by ``1/|x|`` (COSINE) beats a pass over the ``(tile, queries)`` scores.
    chunk
        Rows per run whose minimum decides whether the run is compared at all (transposed
        tiles), and the longest run of a first tile's seed bound.
    min_rows_per_worker
        Rows per worker below which splitting a scan costs more (thread hand-off, a second
        selection) than it saves.
    min_work
        Multiply-adds a search of several queries must have before it is split among workers
        (the sampled bounds' own split too).
    min_work_one_query
        The same for a single query. Measured with the CPU backend's einsum stream, ms whole
        against split: 0.75 against 0.85 at 30,000 x 128, 2.68 against 1.95 at 100,000, 4.82
        against 3.54 at 200,000.
    lazy
        Admitted scores per candidate kept that may wait for a merge (sampled bounds): a bigger
        buffer merges less often and holds more memory.
    sample_min_c
        Candidates kept per query (``c``) from which each query's admission bound is sampled up
        front instead of merged after every tile (k about 56 and up with the CPU's margin).
    sample_stride
        At most every ``sample_stride``-th row is sampled (the sample costs that fraction of a
        scan).
    finalize_bytes
        Float64 candidate vectors re-scored exactly at once (per worker): small enough for the
        temporaries to stay in the caches on a CPU; on a GPU each piece is a few kernel launches.

    Raises
    ------
    ValueError
        A field out of its range (a size below 1, ``margin`` or ``lazy`` negative).
    """

    working_set: int = 16 << 20
    free_memory_divisor: int | None = None
    max_tile_bytes: int = 1 << 30
    max_block: int = 1000
    min_tile_rows: int = 1024
    tile_per_candidate: int = 8
    margin: int = 8
    transpose_min: int = 32
    augment_min: int = 256
    chunk: int = 64
    min_rows_per_worker: int = 4096
    min_work: int = 1 << 22
    min_work_one_query: int = 1 << 22
    lazy: int = 1
    sample_min_c: int = 64
    sample_stride: int = 16
    finalize_bytes: int = 2 << 20

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "free_memory_divisor":
                continue
            if type(value) is not int:
                raise ValueError(f"Profile.{f.name} must be an int, got {value!r}")
            floor = 0 if f.name in ("margin", "lazy", "min_work", "min_work_one_query") else 1
            if value < floor:
                raise ValueError(f"Profile.{f.name} must be at least {floor}, got {value}")

    def tile_bytes(self, working_set: int, free: int | None) -> int:
        """Bytes of score tiles a search may hold, given the caller's ``working_set`` and the
        device's ``free`` memory in bytes (``None``: unknown, as on the CPU and the test stand-in):
        the working set, or with :attr:`free_memory_divisor` set, ``free / divisor`` capped at
        :attr:`max_tile_bytes`, never less than the working set."""
        if self.free_memory_divisor is None or free is None:
            return working_set
        return max(working_set, min(free // self.free_memory_divisor, self.max_tile_bytes))


#: The CPU's profile: the values measured on the machine iqdb was tuned on (see :class:`Profile`).
CPU_PROFILE = Profile()

#: The GPU's profile (values chosen, not yet measured on a GPU: ``bench/bench_gpu.py`` will tell).
#: Big tiles, up to an eighth of the free device memory (1 GiB at most), so that host syncs per tile
#: and kernel launches stay few; blocks of 1,024 queries (the cache effect behind the CPU's 1,000
#: does not apply); exact re-scoring in pieces of 64 MiB, not cache-sized ones (a block of 1,024
#: queries at d = 768 then re-scores about 10 candidates per launch, not 1). The split floors keep
#: the CPU's values: a GPU search runs serially on the host (the device is the parallelism), so
#: they never apply.
GPU_PROFILE = Profile(free_memory_divisor=8, max_block=1024, finalize_bytes=64 << 20)

#: The default ``working_set`` of a search (the CPU profile's).
DEFAULT_WORKING_SET = CPU_PROFILE.working_set

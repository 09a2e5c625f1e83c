"""Tuning profiles (``iqdb.kernels.Profile``): they move time and memory, never an answer, and
every field is really used.

Each driver (the adaptive one on NumPy, the fixed-shape one on the CuPy-like stand-in of
``tests/standin.py``) runs under the CPU's profile, the GPU's and a profile of tiny tiles, blocks
and thresholds: ids and score bits must be identical. Spies then show that changing a field
moves the behaviour it documents, and a fake ``memGetInfo`` checks the GPU's tile rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from standin import ledger, standin_backend

import iqdb
from iqdb.kernels import (
    CPU_PROFILE,
    DEFAULT_WORKING_SET,
    GPU_PROFILE,
    ArrayBackend,
    Profile,
    _fixed,
    _flat,
    cpu_backend,
    fixed_topk,
    flat_topk,
)
from iqdb.kernels._parallel import Parallel

METRICS = ["l2", "cosine", "dot"]
N, D = 3000, 16

# Everything as small as it goes: many tiles, blocks of a few queries, every layout from two
# queries up, sampled bounds from c = 8, one candidate re-scored at a time, no candidate margin
# (every query is re-scanned), splits of any size.
TINY = Profile(
    working_set=4096,
    max_block=7,
    min_tile_rows=1,
    tile_per_candidate=1,
    margin=0,
    transpose_min=2,
    augment_min=3,
    chunk=4,
    min_rows_per_worker=1,
    min_work=0,
    min_work_one_query=0,
    lazy=0,
    sample_min_c=8,
    sample_stride=2,
    finalize_bytes=1,
)


class InlineWorkers(Parallel):
    """Claims ``workers`` cores, runs the tasks one after another."""

    def __init__(self, workers: int) -> None:
        self.workers = workers


def dataset() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random rows with exact duplicates, zero rows (NaN under cosine) and near-ties, shuffled
    ids, and a dead set holding some of each."""
    rng = np.random.default_rng(21)
    X = rng.standard_normal((N, D)).astype(np.float32)
    X[5:25] = X[3]
    X[30:34] = 0.0
    X[40:60] = X[3] + rng.standard_normal((20, D)).astype(np.float32) * 1e-6
    ids = rng.permutation(np.arange(10 * N, 11 * N, dtype=np.uint64))
    dead = np.union1d(np.flatnonzero(rng.random(N) < 0.05), [3, 5, 6, 30, 41]).astype(np.int64)
    return X, np.sum(X.astype(np.float64) ** 2, axis=1), ids, dead


def queries(m: int, seed: int) -> np.ndarray:
    X = dataset()[0]
    Q = np.random.default_rng(seed).standard_normal((m, D)).astype(np.float32)
    Q[:1] = X[3]  # on the duplicates
    Q[1:2] = 0.0  # a zero query: every cosine score is NaN
    Q[2:3] = X[45]  # among the near-ties
    return Q


def flat(Q: np.ndarray, k: int, metric: str, profile: Profile, dead: bool, **kw: Any) -> tuple[Any, Any]:
    X, norms, ids, dd = dataset()
    out = flat_topk(np, X, norms, ids, Q, k, metric, dead=dd if dead else None, profile=profile, **kw)
    return out.rows, out.scores


def fixed(Q: np.ndarray, k: int, metric: str, profile: Profile, dead: bool) -> tuple[Any, Any]:
    """The GPU's driver on the stand-in backend carrying ``profile``, its working set from the
    backend's tile rule (as a search gets it); no implicit host conversion allowed."""
    be = dataclasses.replace(standin_backend(), profile=profile)
    X, norms, ids, dd = dataset()
    up = [be.asarray(a) for a in (X, norms, ids, Q, dd)]
    with ledger.record() as t:
        out = fixed_topk(
            be.xp,
            *up[:4],
            k,
            metric,
            dead=up[4] if dead else None,
            working_set=be.tile_bytes(profile.working_set),
            profile=be.profile,
        )
    assert t.implicit == 0, t.sites("implicit")
    return be.to_host(out.rows), be.to_host(out.scores)


def assert_same(got: tuple[Any, Any], want: tuple[Any, Any], what: str) -> None:
    assert got[0].shape == want[0].shape, what
    np.testing.assert_array_equal(got[0], want[0], err_msg=what)
    bits = [np.ascontiguousarray(s, dtype=np.float64).view(np.uint64) for s in (got[1], want[1])]
    np.testing.assert_array_equal(bits[0], bits[1], err_msg=f"{what}: score bits")


# -- (a) the profiles give the same answers ------------------------------------------------------


@pytest.mark.parametrize("dead", [False, True], ids=["live", "dead"])
@pytest.mark.parametrize("m", [1, 40, 300])
@pytest.mark.parametrize("k", [1, 10, 100])
@pytest.mark.parametrize("metric", METRICS)
def test_the_cpu_and_gpu_profiles_give_identical_answers_on_both_drivers(
    metric: str, k: int, m: int, dead: bool
) -> None:
    """A profile is tuning only: the adaptive driver under the GPU's profile, and the fixed-shape
    driver (on the stand-in) under the CPU's, answer what each gives under its own profile, ids
    and score bits, on duplicates, zero rows, a zero query and near-ties."""
    Q = queries(m, seed=k + m)
    want = flat(Q, k, metric, CPU_PROFILE, dead)
    assert_same(flat(Q, k, metric, GPU_PROFILE, dead), want, "adaptive driver, GPU profile")
    assert_same(fixed(Q, k, metric, GPU_PROFILE, dead), want, "fixed driver, GPU profile")
    assert_same(fixed(Q, k, metric, CPU_PROFILE, dead), want, "fixed driver, CPU profile")


# -- (b) tiny tiles, blocks and thresholds: the same answers ------------------------------------


@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("k", [1, 10, 100])
@pytest.mark.parametrize("metric", METRICS)
def test_a_profile_of_tiny_tiles_and_blocks_gives_the_same_answers(metric: str, k: int, m: int) -> None:
    """Hundreds of tiles and blocks, every layout, lazy merges with no spare room, re-scans of
    every query (no margin), scans split among three workers, exact re-scoring one candidate at a
    time: the same ids and score bits as the CPU profile."""
    Q = queries(m, seed=3 * k + m)
    for dead in (False, True):
        want = flat(Q, k, metric, CPU_PROFILE, dead)
        got = flat(Q, k, metric, TINY, dead, parallel=InlineWorkers(3))
        assert_same(got, want, f"adaptive driver, tiny profile, dead={dead}")
        assert_same(fixed(Q, k, metric, TINY, dead), want, f"fixed driver, tiny profile, dead={dead}")


# -- (c) each field moves what it claims ---------------------------------------------------------


@pytest.fixture
def tilers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool, bool]]:
    """(queries, transposed, augmented) of every score tiler the adaptive driver makes (a
    near-tie re-scan's tiler, over the few queries that need it, always lays rows out)."""
    made: list[tuple[int, bool, bool]] = []
    init = _flat._Tiler.__init__

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append((int(self.Qc.shape[0]), self.transposed, self.augment))

    monkeypatch.setattr(_flat._Tiler, "__init__", spy)
    return made


@pytest.mark.parametrize("threshold", [5, 32, 90])
def test_the_transposed_layout_starts_at_transpose_min(
    threshold: int, tilers: list[tuple[int, bool, bool]]
) -> None:
    profile = dataclasses.replace(CPU_PROFILE, transpose_min=threshold, augment_min=10_000)
    for m in (threshold - 1, threshold):
        tilers.clear()
        flat(queries(m, seed=m), 10, "l2", profile, dead=False)
        assert {t[1] for t in tilers if t[0] == m} == {m >= threshold}


@pytest.mark.parametrize("threshold", [40, 256])
def test_augmented_tiles_start_at_augment_min(threshold: int, tilers: list[tuple[int, bool, bool]]) -> None:
    profile = dataclasses.replace(CPU_PROFILE, augment_min=threshold)
    for m in (threshold - 1, threshold):
        tilers.clear()
        flat(queries(m, seed=m), 10, "l2", profile, dead=False)
        assert {t[2] for t in tilers if t[0] == m} == {m >= threshold}


def test_max_block_sets_the_query_blocks_of_both_drivers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of ``ceil(m / ceil(m / max_block))`` queries: none above ``max_block``."""
    blocks: list[int] = []
    flat_block, fixed_block = _flat._search_block, _fixed._block

    def spy_flat(xp_: Any, cand: Any, ids: Any, Qb: Any, *args: Any) -> Any:
        blocks.append(int(Qb.shape[0]))
        return flat_block(xp_, cand, ids, Qb, *args)

    def spy_fixed(xp_: Any, cand: Any, ids: Any, Qb: Any, *args: Any) -> Any:
        blocks.append(int(Qb.shape[0]))
        return fixed_block(xp_, cand, ids, Qb, *args)

    monkeypatch.setattr(_flat, "_search_block", spy_flat)
    monkeypatch.setattr(_fixed, "_block", spy_fixed)
    Q = queries(50, seed=1)
    for run in (flat, fixed):
        for most, want in ((7, [7] * 7 + [1]), (25, [25, 25]), (1000, [50])):
            blocks.clear()
            run(Q, 10, "dot", dataclasses.replace(CPU_PROFILE, max_block=most), False)
            assert blocks == want, (run.__name__, most)


def test_min_tile_rows_and_the_working_set_set_the_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixed driver's tiles: ``working_set / (4 m)`` rows, at least ``min_tile_rows``, in whole
    32-row words (the live-row bitset's); with no working set given, the profile's."""
    tiles: list[int] = []
    scores = _fixed._Tiler.scores

    def spy(self: Any, t0: int, t1: int, **kw: Any) -> Any:
        tiles.append(t1 - t0)
        return scores(self, t0, t1, **kw)

    monkeypatch.setattr(_fixed._Tiler, "scores", spy)
    X, norms, ids, _ = dataset()
    Q = queries(8, seed=2)
    for profile, ws, want in (
        (dataclasses.replace(CPU_PROFILE, min_tile_rows=100), 4096, 128),  # 4096 / (4 x 8) rows
        (dataclasses.replace(CPU_PROFILE, min_tile_rows=2000), 4096, 2016),  # whole words
        (dataclasses.replace(CPU_PROFILE, min_tile_rows=1, working_set=32 * 320), None, 320),
    ):
        tiles.clear()
        fixed_topk(np, X, norms, ids, Q, 5, "l2", working_set=ws, profile=profile)
        count = -(-N // want)  # the scan's tiles (a re-scan's may follow)
        assert tiles[:count] == [want] * (count - 1) + [N - want * (count - 1)], (profile, tiles[:3])


def test_sample_min_c_decides_when_bounds_are_sampled(monkeypatch: pytest.MonkeyPatch) -> None:
    sampled: list[bool] = []
    original = _flat._sample_bound

    def spy(*args: Any, **kwargs: Any) -> Any:
        theta = original(*args, **kwargs)
        sampled.append(theta is not None)
        return theta

    monkeypatch.setattr(_flat, "_sample_bound", spy)
    Q = queries(40, seed=3)
    for c_min in (18, 19):  # k = 10 keeps c = 18 with the CPU's margin of 8
        sampled.clear()
        flat(Q, 10, "l2", dataclasses.replace(CPU_PROFILE, sample_min_c=c_min), False)
        assert sampled == [c_min <= 18]


def test_the_split_floors_decide_whether_a_scan_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    runner, tasks = InlineWorkers(3), []
    monkeypatch.setattr(runner, "map", lambda fn, n: tasks.append(fn.__name__) or Parallel.map(runner, fn, n))
    Q = queries(40, seed=4)
    for min_work, split in ((40 * N * D, True), (40 * N * D + 1, False)):
        tasks.clear()
        profile = dataclasses.replace(CPU_PROFILE, min_work=min_work, min_rows_per_worker=1)
        flat(Q, 10, "l2", profile, False, parallel=runner)
        assert ("scan" in tasks) == split, min_work
    tasks.clear()
    profile = dataclasses.replace(CPU_PROFILE, min_work=0, min_rows_per_worker=N)  # one worker's worth
    flat(Q, 10, "l2", profile, False, parallel=runner)
    assert "scan" not in tasks


def test_finalize_bytes_sets_the_exact_rescoring_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """The adaptive driver re-scores ``finalize_bytes / (8 c d)`` queries at a time."""
    pieces: list[int] = []
    original = _flat._finalize

    def spy(xp_: Any, cand: Any, ids: Any, Q64: Any, *args: Any) -> Any:
        pieces.append(int(Q64.shape[0]))
        return original(xp_, cand, ids, Q64, *args)

    monkeypatch.setattr(_flat, "_finalize", spy)
    Q = queries(40, seed=5)
    c = 10 + CPU_PROFILE.margin
    for per_piece in (1, 7, 20):  # most of the 40 queries are settled by the margin
        pieces.clear()
        flat(Q, 10, "dot", dataclasses.replace(CPU_PROFILE, finalize_bytes=8 * c * D * per_piece), False)
        assert max(pieces) == per_piece and sum(pieces) <= 40, pieces


def test_the_margin_is_the_count_of_extra_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    kept: list[int] = []
    original = _flat._coarse_best

    def spy(*args: Any, **kwargs: Any) -> Any:
        best_s, best_r = original(*args, **kwargs)
        kept.append(int(best_s.shape[1]))
        return best_s, best_r

    monkeypatch.setattr(_flat, "_coarse_best", spy)
    for margin in (0, 3, 20):
        kept.clear()
        flat(queries(40, seed=6), 10, "l2", dataclasses.replace(CPU_PROFILE, margin=margin), False)
        assert kept[0] == 10 + margin


def test_a_search_runs_with_its_backends_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handle hands the kernel its backend's profile (the CPU's here)."""
    seen: list[Profile] = []
    real = iqdb._search.flat_topk

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["profile"])
        return real(*args, **kwargs)

    monkeypatch.setattr(iqdb._search, "flat_topk", spy)
    with iqdb.open_in_memory(device="cpu") as db:
        db.upsert_many(range(10), np.eye(10, dtype=np.float32))
        db.search(np.ones(10, dtype=np.float32), 3, "l2")
    assert seen == [CPU_PROFILE] and seen[0] is cpu_backend().profile


# -- (d) the GPU's tile rule -----------------------------------------------------------------------


@pytest.fixture
def fake_device() -> Iterator[tuple[Any, list[int]]]:
    """A namespace whose ``cuda.runtime.memGetInfo`` reports ``free[0]`` bytes free; yields it
    and that list."""
    free = [0]

    @contextlib.contextmanager
    def device(index: int) -> Iterator[None]:
        yield

    runtime = types.SimpleNamespace(memGetInfo=lambda: (free[0], 80 << 30))
    yield types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime, Device=device)), free


@pytest.mark.parametrize(
    ("free", "working_set", "want"),
    [
        (40 << 30, 16 << 20, 1 << 30),  # an eighth would be 5 GiB: capped at 1 GiB
        (8 << 30, 16 << 20, 1 << 30),  # exactly the cap
        (800 << 20, 16 << 20, 100 << 20),  # an eighth of the free memory
        (8 << 20, 16 << 20, 16 << 20),  # an eighth is 1 MiB: never below the working set
        (0, 64 << 10, 64 << 10),  # nothing free: the working set
        (40 << 30, 2 << 30, 2 << 30),  # a working set above the cap wins
    ],
)
def test_the_gpu_profile_sizes_tiles_from_free_device_memory(
    fake_device: tuple[Any, list[int]], free: int, working_set: int, want: int
) -> None:
    fake, free_now = fake_device
    free_now[0] = free
    be = ArrayBackend("cuda:0", fake, device_index=0, fixed_shape=True, profile=GPU_PROFILE)
    assert be.tile_bytes(working_set) == want
    assert GPU_PROFILE.tile_bytes(working_set, free) == want
    assert CPU_PROFILE.tile_bytes(working_set, free) == working_set
    # The CPU profile on the same device, and the stand-in (no memGetInfo): the working set.
    assert dataclasses.replace(be, profile=CPU_PROFILE).tile_bytes(working_set) == working_set
    standin = dataclasses.replace(standin_backend(), profile=GPU_PROFILE)
    assert standin.tile_bytes(working_set) == working_set


def test_the_tile_rule_is_the_profiles(fake_device: tuple[Any, list[int]]) -> None:
    """Another divisor and cap change the rule (the backend keeps no numbers of its own)."""
    fake, free = fake_device
    free[0] = 1 << 30
    profile = dataclasses.replace(GPU_PROFILE, free_memory_divisor=4, max_tile_bytes=200 << 20)
    be = ArrayBackend("cuda:0", fake, device_index=0, profile=profile)
    assert be.tile_bytes(1 << 20) == 200 << 20
    free[0] = 400 << 20
    assert be.tile_bytes(1 << 20) == 100 << 20


# -- the profiles themselves ---------------------------------------------------------------------


def test_the_cpu_profile_keeps_the_measured_values() -> None:
    """The CPU benchmarks were measured with these: changing one is a tuning change to measure."""
    assert dataclasses.asdict(CPU_PROFILE) == {
        "working_set": 16 << 20,
        "free_memory_divisor": None,
        "max_tile_bytes": 1 << 30,
        "max_block": 1000,
        "min_tile_rows": 1024,
        "tile_per_candidate": 8,
        "margin": 8,
        "transpose_min": 32,
        "augment_min": 256,
        "chunk": 64,
        "min_rows_per_worker": 4096,
        "min_work": 1 << 22,
        "min_work_one_query": 1 << 22,
        "lazy": 1,
        "sample_min_c": 64,
        "sample_stride": 16,
        "finalize_bytes": 2 << 20,
    }
    assert DEFAULT_WORKING_SET == CPU_PROFILE.working_set == iqdb.open_in_memory.__kwdefaults__["working_set"]
    assert GPU_PROFILE.max_block == 1024 and GPU_PROFILE.free_memory_divisor == 8


@pytest.mark.parametrize(
    "bad",
    [{"max_block": 0}, {"chunk": 0}, {"working_set": -1}, {"margin": -1}, {"lazy": -1}, {"max_block": 2.5}],
)
def test_a_profile_out_of_range_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        Profile(**bad)

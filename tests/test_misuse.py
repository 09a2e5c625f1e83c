"""Misuse and hostile input: bad data raises an ``IqdbError``, never anything else, and never
reaches the store; the caller's arrays are copied before they are checked; a checkout runs its
tests; the process-wide BLAS limit of a search is always lifted."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import iqdb
from iqdb import Corrupt, DistanceMetric, InvalidArgument, IqdbError, Payload, Record, SearchResult, Vector
from iqdb._payload import decode_payload, encode_payload
from iqdb._values import as_matrix, as_vector_array
from iqdb.kernels._parallel import ThreadedCpu, _BlasLimit, cpu_parallel

ROOT = Path(__file__).resolve().parent.parent


def _record(payload: Any) -> dict[str, Any]:
    return {"id": 1, "vector": [1.0, 2.0], "payload": payload}


def _result(payload: Any, score: Any = 0.5) -> dict[str, Any]:
    return {"id": 1, "score": score, "payload": payload}


def _nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# --- item 7: from_dict and payload coercion raise only IqdbErrors --------------------------


@pytest.mark.parametrize("body", ["!!!!", "é", "YQ", "YQ=\n", "==", 1, None, ["YQ=="], {"a": 1}])
def test_a_malformed_bytes_tag_raises_invalid_argument(body: Any) -> None:
    for payload in (
        {"k": {"$bytes": body}},
        {"k": [1, {"$bytes": body}]},
        {"$dict": {"$x": {"$bytes": body}}},
    ):
        with pytest.raises(InvalidArgument, match="bad \\$bytes tag"):
            Record.from_dict(_record(payload))
        with pytest.raises(InvalidArgument, match="bad \\$bytes tag"):
            SearchResult.from_dict(_result(payload))


@pytest.mark.parametrize("body", ["x", "NaN", 1.0, None, ["nan"], np.array(["nan", "nan"])])
def test_a_malformed_float_tag_raises_invalid_argument(body: Any) -> None:
    with pytest.raises(InvalidArgument, match="bad \\$float tag"):
        Record.from_dict(_record({"k": {"$float": body}}))
    with pytest.raises(InvalidArgument, match="bad \\$float tag"):
        SearchResult.from_dict(_result(None, score={"$float": body}))


@pytest.mark.parametrize("key", [1, None, 1.5, (1,), True, "\ud800", "a\udfffb"])
def test_from_dict_refuses_payload_keys_a_write_could_not_store(key: Any) -> None:
    # Such a key used to get in, and the durable write failed later (AttributeError,
    # UnicodeEncodeError) with the record already accepted.
    for payload in ({key: 1}, {"a": {key: 1}}, {"$dict": {key: 1}}, {"a": [{"$dict": {key: 1}}]}):
        with pytest.raises(InvalidArgument, match="key"):
            Record.from_dict(_record(payload))
        with pytest.raises(InvalidArgument, match="key"):
            SearchResult.from_dict(_result(payload))


@pytest.mark.parametrize("depth", [62, 63, 64, 65, 66])
def test_from_dict_nests_exactly_as_deep_as_a_payload(depth: int) -> None:
    nested = {"k": _nested(depth)}
    try:
        Payload(nested)
    except InvalidArgument:
        accepted = False
    else:
        accepted = True
    assert accepted == (depth <= 64)
    encoded = _nested(depth, {"$bytes": "YQ=="})
    if accepted:
        assert Record.from_dict(_record(nested)).payload == nested
        assert SearchResult.from_dict(_result({"k": encoded})).payload == {"k": _nested(depth, b"a")}
    else:
        with pytest.raises(InvalidArgument, match="nested deeper"):
            Record.from_dict(_record(nested))
        with pytest.raises(InvalidArgument, match="nested deeper"):
            SearchResult.from_dict(_result({"k": encoded}))


def test_from_dict_of_garbage_nested_past_the_recursion_limit_raises_invalid_argument() -> None:
    deep_dict: dict[str, Any] = {}
    cur = deep_dict
    for _ in range(5000):
        cur["a"] = {}
        cur = cur["a"]
    for payload in ({"k": _nested(5000)}, deep_dict, {"$dict": deep_dict}):
        with pytest.raises(InvalidArgument):
            Record.from_dict(_record(payload))
        with pytest.raises(InvalidArgument):
            SearchResult.from_dict(_result(payload))


@pytest.mark.parametrize("data", [None, [], [("id", 1)], "id", 5, np.array([1, 2]), Vector([1.0])])
def test_from_dict_of_something_not_a_mapping_raises_invalid_argument(data: Any) -> None:
    with pytest.raises(InvalidArgument, match="must be a mapping"):
        Record.from_dict(data)
    with pytest.raises(InvalidArgument, match="must be a mapping"):
        SearchResult.from_dict(data)


def test_a_score_too_large_for_a_float_raises_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="score"):
        SearchResult(1, 10**400)
    with pytest.raises(InvalidArgument, match="score"):
        SearchResult.from_dict(_result(None, score=10**400))
    assert SearchResult.from_dict(_result(None, score=2**80)).score == float(2**80)


def test_numpy_scalars_without_a_python_twin_raise_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="unsupported type"):
        Payload({"k": np.clongdouble(1)})
    value = np.longdouble(1.5)
    if not isinstance(value.item(), np.generic):
        pytest.skip("long double is double here: it has a Python twin")
    with pytest.raises(InvalidArgument, match="unsupported type longdouble"):
        Payload({"k": value})
    with pytest.raises(InvalidArgument, match="unsupported type"):
        Record(1, [1.0], {"a": [value]})


def test_an_unknown_metric_raises_invalid_argument_without_echoing_it() -> None:
    with pytest.raises(InvalidArgument, match="unknown metric 'bogus'"):
        DistanceMetric("bogus")
    with pytest.raises(InvalidArgument, match="of type NoneType"):
        DistanceMetric(None)  # type: ignore[arg-type]
    assert DistanceMetric("dot") is DistanceMetric.DOT
    # A metric whose repr would recurse past the limit.
    with iqdb.open_in_memory() as db, pytest.raises(InvalidArgument, match="of type list"):
        db.search([1.0], 1, metric=_nested(5000))


_ATOMS: list[Any] = [
    None, True, 0, -1, 2**63 - 1, 2**63, -(2**63) - 1, 10**400, 1.5, float("nan"), float("inf"), "", "s",
    "\ud800", "$float", "$bytes", "$dict", "nan", "YQ==", "!!", "é==", b"x", bytearray(b"y"), 1j, object(),
    np.float32(1), np.int64(5), np.uint64(2**64 - 1), np.longdouble(2), np.bool_(True), np.array([1.0]),
    {1, 2}, (1, "a"),
]  # fmt: skip
_KEYS: list[Any] = ["a", "$float", "$bytes", "$dict", "", "\ud800", 1, None, 1.5, (1,), "b.c", np.str_("k")]


def _garbage(rnd: random.Random, depth: int = 0) -> Any:
    r = rnd.random()
    if depth > 4 or r < 0.45:
        return rnd.choice(_ATOMS)
    if r < 0.7:
        return [_garbage(rnd, depth + 1) for _ in range(rnd.randrange(3))]
    return {rnd.choice(_KEYS): _garbage(rnd, depth + 1) for _ in range(rnd.choice([0, 1, 1, 1, 2, 3]))}


def test_from_dict_fuzz_raises_only_iqdb_errors_and_what_it_accepts_survives_a_durable_write(
    tmp_path: Path,
) -> None:
    rnd = random.Random(7)
    accepted: list[Record] = []
    for i in range(6000):
        make: Callable[[Any], Record | SearchResult]
        if i % 2:
            data: Any = {"id": 1, "vector": rnd.choice([[1.0, 2.0], _garbage(rnd)]), "payload": _garbage(rnd)}
            make = Record.from_dict
        else:
            data = {"id": rnd.choice([1, _garbage(rnd)]), "score": rnd.choice([0.5, _garbage(rnd)])}
            data["payload"] = _garbage(rnd)
            make = SearchResult.from_dict
        if rnd.random() < 0.1:
            del data[rnd.choice(list(data))]
        try:
            value = make(data)
        except IqdbError:
            continue
        # Anything else escaping fails the test with the data that caused it.
        assert type(value).from_dict(json.loads(json.dumps(value.to_dict()))) == value
        if isinstance(value, Record) and value.vector.dim == 2:
            accepted.append(Record(len(accepted), value.vector, value.payload))
    assert len(accepted) > 100
    with iqdb.open(tmp_path / "db") as db:
        db.upsert_many(
            [int(r.id) for r in accepted], [r.vector for r in accepted], [r.payload for r in accepted]
        )
    with iqdb.open(tmp_path / "db", readonly=True) as db:
        assert [db.get(r.id) for r in accepted] == accepted


def test_corrupt_payload_bytes_are_not_echoed() -> None:
    raw = encode_payload(Payload({"SECRETKEY": "SECRETVALUE"}))
    assert raw is not None
    for bad in (raw.replace(b"SECRETVALUE", b"\xffECRETVALUE"), raw.replace(b"SECRETKEY", b"SECRETKE\xff")):
        with pytest.raises(Corrupt) as info:
            decode_payload(bad)
        shown = "".join(traceback.format_exception(info.value))
        assert "not valid UTF-8" in str(info.value)
        for secret in ("ECRET", "0xff", "\\xff"):
            assert secret not in shown


# --- item 5: the caller's array is copied, then checked --------------------------------------


class _Racing(np.ndarray):  # type: ignore[type-arg]
    """An array whose owner writes NaN into it right after NumPy first computes with it, as a
    caller's thread can between a check of the array and a copy of it."""

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        plain = [np.asarray(x) if isinstance(x, _Racing) else x for x in inputs]
        out = getattr(ufunc, method)(*plain, **kwargs)
        np.asarray(self)[...] = np.nan
        return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_the_result_is_a_private_copy_of_the_callers_array(dtype: Any) -> None:
    matrix = np.arange(1, 13, dtype=dtype).reshape(3, 4)
    vector = np.arange(1, 5, dtype=dtype)
    outs = [
        (as_matrix(matrix), matrix),
        (as_vector_array(vector), vector),
        (Vector(vector).to_numpy(), vector),
    ]
    want = [o.copy() for o, _ in outs]
    for out, given in outs:
        assert out.dtype == np.float32 and out.flags.c_contiguous
        assert not np.shares_memory(out, given)
    matrix[...] = np.nan if dtype != np.int32 else 0
    vector[...] = np.nan if dtype != np.int32 else 0
    for (out, _), before in zip(outs, want):
        np.testing.assert_array_equal(out, before)


def test_the_checks_run_on_the_copy_not_on_the_callers_array() -> None:
    vector = np.arange(1, 5, dtype=np.float32).view(_Racing)
    assert Vector(vector).tolist() == [1.0, 2.0, 3.0, 4.0]
    vector = np.arange(1, 5, dtype=np.float32).view(_Racing)
    np.testing.assert_array_equal(as_vector_array(vector), [1, 2, 3, 4])
    matrix = np.arange(1, 13, dtype=np.float32).reshape(3, 4).view(_Racing)
    out = as_matrix(matrix)
    assert type(out) is np.ndarray
    np.testing.assert_array_equal(out, np.arange(1, 13).reshape(3, 4))


# --- item 10: the tests run from a checkout whatever is installed ----------------------------


def test_kernels_load_from_a_checkout_without_the_package_dir_mapping() -> None:
    # -I -S: no site-packages and no .pth files, so no editable install's finder maps
    # iqdb.kernels; the checkout comes first on the path, as with `python -m pytest` in it.
    site = str(Path(np.__file__).resolve().parent.parent)
    code = f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {site!r}]
        import iqdb
        import iqdb.kernels
        from iqdb.kernels._parallel import cpu_parallel
        assert iqdb.__file__ == {str(ROOT / "iqdb" / "__init__.py")!r}, iqdb.__file__
        assert iqdb.kernels.__file__ == {str(ROOT / "kernels" / "__init__.py")!r}, iqdb.kernels.__file__
        assert sys.modules["iqdb.kernels"] is iqdb.kernels
        assert cpu_parallel.__module__ == "iqdb.kernels._parallel"
        assert "kernels" not in sys.modules
        assert iqdb.DistanceMetric.L2.distance([0, 0], [3, 4]) == 5.0
        with iqdb.open_in_memory(device="cpu") as db:
            assert db.search([1.0], 1) == []
        print("OK")
        """
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT.parent,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"


# --- item 11: the process-wide BLAS limit of a search is lifted after it ----------------------


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


@pytest.fixture
def split_db() -> Any:
    """An in-memory database big enough that one query's search is split over the workers."""
    if not isinstance(cpu_parallel(), ThreadedCpu):
        pytest.skip("the CPU runner is serial here (one core, or no BLAS whose threads can be set)")
    rng = np.random.default_rng(0)
    n, d = 9000, 512  # n * d >= 2**22 and n >= 2 * 4096: two workers
    with iqdb.open_in_memory(device="cpu") as db:
        db.upsert_many(np.arange(n), rng.standard_normal((n, d), dtype=np.float32))
        yield db


@pytest.fixture
def task_blas(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The BLAS thread counts each task of a split search saw (proof the search was split)."""
    seen: list[list[int]] = []
    real = ThreadedCpu.map

    def recording(self: ThreadedCpu, fn: Callable[[int], Any], n: int) -> list[Any]:
        def task(i: int) -> Any:
            seen.append(_blas_threads())
            return fn(i)

        return real(self, task, n)

    monkeypatch.setattr(ThreadedCpu, "map", recording)
    return seen


def test_the_blas_limit_is_lifted_after_every_search(split_db: iqdb.Iqdb, task_blas: list[list[int]]) -> None:
    before = _blas_threads()
    assert before and max(before) > 1
    q = np.random.default_rng(1).standard_normal((3, 512), dtype=np.float32)
    for search in (
        lambda: split_db.search(q[0], 10),
        lambda: split_db.search(q[0], 10, "l2"),
        lambda: split_db.search_batch(q, 10, "dot"),
        lambda: split_db.search_arrays(q, 5),
    ):
        task_blas.clear()
        search()
        assert task_blas and all(counts == [1] * len(before) for counts in task_blas)
        assert _blas_threads() == before


def test_the_blas_limit_is_lifted_after_a_search_that_raises_inside_the_split(
    split_db: iqdb.Iqdb, task_blas: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _blas_threads()
    limited = ThreadedCpu.map  # records, see task_blas

    def failing(self: ThreadedCpu, fn: Callable[[int], Any], n: int) -> list[Any]:
        def task(i: int) -> Any:
            if i == n - 1:
                raise MemoryError("a worker ran out of memory")
            return fn(i)

        return limited(self, task, n)

    monkeypatch.setattr(ThreadedCpu, "map", failing)
    q = np.random.default_rng(2).standard_normal((2, 512), dtype=np.float32)
    for search in (lambda: split_db.search(q[0], 10), lambda: split_db.search_batch(q, 10)):
        task_blas.clear()
        # The search retries with smaller tiles, then says so, with the worker's error as cause.
        with pytest.raises(MemoryError, match="out of memory searching") as raised:
            search()
        assert "ran out" in str(raised.value.__cause__)
        assert task_blas and all(max(counts) == 1 for counts in task_blas)
        assert _blas_threads() == before
    monkeypatch.setattr(ThreadedCpu, "map", limited)
    assert len(split_db.search(q[0], 10)) == 10
    assert _blas_threads() == before


class _FakeBlas:
    def __init__(self, threads: int, refuses: bool = False) -> None:
        self.num_threads = threads
        self.refuses = refuses

    def set_num_threads(self, n: int) -> None:
        if self.refuses:
            raise RuntimeError("refused")
        self.num_threads = n


def test_a_blas_that_refuses_the_limit_fails_the_search_with_the_others_restored() -> None:
    good, bad = _FakeBlas(4), _FakeBlas(4, refuses=True)
    runner = ThreadedCpu(2, _BlasLimit([good, bad]))  # type: ignore[list-item]
    with pytest.raises(RuntimeError, match="refused"):
        runner.map(lambda i: i, 2)
    assert good.num_threads == 4
    bad.refuses = False
    assert runner.map(lambda i: (good.num_threads, bad.num_threads), 2) == [(1, 1), (1, 1)]
    assert (good.num_threads, bad.num_threads) == (4, 4)

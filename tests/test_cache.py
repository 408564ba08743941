"""The byte-bounded cache: sizes measured (against buffers and the resident memory they take),
least recently used out, one build per key under threads, sessions kept apart."""

from __future__ import annotations

import functools
import gc
import random
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from detr_viz import analyze, explain, memory
from detr_viz.cache import (
    BUDGET_ENV,
    DEFAULT_BUDGET,
    HISTORY,
    ByteCache,
    budget_from_env,
    nbytes,
)
from detr_viz.errors import ArgumentError

from conftest import photo, recipe_model, small_analysis

MB = 1 << 20


def sized(n: int) -> np.ndarray:
    return np.zeros(n, np.uint8)


def measured(value) -> int:
    return value.nbytes  # the buffer only: exact sizes in the cache tests


@pytest.mark.parametrize(("text", "expected"), [
    ("", DEFAULT_BUDGET), ("123", 123), ("2G", 2 * 2**30), ("1500M", 1500 * 2**20),
    ("1.5GiB", 3 * 2**29), (" 64kb ", 64 * 2**10)])
def test_budget_from_env(text, expected):
    assert budget_from_env({BUDGET_ENV: text} if text else {}) == expected


@pytest.mark.parametrize("text", ["lots", "-1G", "0", "2 GB of RAM", "1e9"])
def test_budget_from_env_refuses_what_is_not_a_size_and_says_how(text):
    with pytest.raises(ArgumentError, match=f"{BUDGET_ENV}=.*'2G'"):
        budget_from_env({BUDGET_ENV: text})


def test_nbytes_counts_each_buffer_once_and_a_view_as_its_whole_buffer():
    big = np.ones((1000, 1000))
    overhead = nbytes([big[:1], big[5:7], big.T]) - big.nbytes
    assert 0 < overhead < 2000  # the list and three array headers
    tensor = torch.ones(1000, 250)
    shared = [tensor, tensor[10:20], tensor.numpy()]  # one storage behind all three
    assert tensor.untyped_storage().nbytes() <= nbytes(shared) < 10**6 + 2000
    record = {"a": big, "b": (big, "x" * 10**5)}
    assert big.nbytes + 10**5 < nbytes(record) < big.nbytes + 10**5 + 2000


def test_nbytes_leaves_models_out():
    model = torch.nn.Linear(1000, 1000)
    assert nbytes({"model": model}) < 1000


MEASURE = """
import os, sys
from PIL import Image
def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
mode = sys.argv[1]
bands = len(Image.new(mode, (1, 1)).getbands())
fill = 77 if bands == 1 else (77,) * bands
before = rss()
image = Image.new(mode, (2000, 2000), fill)  # every pixel written: every page resident
print(rss() - before)
"""


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "I;16", "F", "P"])
def test_nbytes_of_an_image_is_the_resident_memory_it_takes(mode):
    """Measured against /proc in a fresh interpreter (no freed blocks to reuse)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, mode], capture_output=True, text=True,
                         check=True)
    grown, counted = int(out.stdout), nbytes(Image.new(mode, (2000, 2000)))
    assert abs(counted - grown) < 0.05 * counted + 256 * 1024, (counted, grown)  # + line table


def test_nbytes_of_an_analysis_holds_every_tensor_of_it():
    analysis = small_analysis()
    tensors = [t for layers in (analysis.encoder, analysis.decoder, analysis.decoder_self)
               for f in layers for t in vars(f).values() if isinstance(t, torch.Tensor)]
    tensors += [t for t in vars(analysis.inputs).values() if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    buffers = sum(storages.values()) + analysis.probabilities.nbytes + analysis.boxes.nbytes
    assert buffers <= nbytes(analysis) < buffers + 64 * 1024


def test_least_recently_used_goes_first_and_the_total_is_the_sum_of_sizes():
    cache = ByteCache(1000, measure=measured)
    for key in "abc":
        cache.get(key, lambda: sized(300))
    cache.get("a", lambda: pytest.fail("a is cached"))  # a is now the most recent
    cache.get("d", lambda: sized(300))  # 1200 > 1000: b, the least recent, goes
    assert [k for k, _ in cache.sizes()] == ["c", "a", "d"]
    assert cache.total == 900 == sum(size for _, size in cache.sizes())
    cache.get("e", lambda: sized(700))  # c and a go
    assert [k for k, _ in cache.sizes()] == ["d", "e"] and cache.total == 1000
    assert cache.evictions == 3


def test_an_entry_over_the_whole_budget_is_kept_alone_until_the_next():
    cache = ByteCache(1000, measure=measured)
    cache.get("small", lambda: sized(10))
    assert cache.get("huge", lambda: sized(5000)).nbytes == 5000
    assert [k for k, _ in cache.sizes()] == ["huge"]
    cache.get("next", lambda: sized(10))
    assert [k for k, _ in cache.sizes()] == ["next"] and cache.total == 10


def test_remeasure_counts_what_a_store_gained_and_evicts_others():
    cache = ByteCache(10_000, measure=nbytes)
    cache.get("old", lambda: sized(4000))
    store = cache.get("store", dict)
    before = cache.total
    store["map"] = sized(5000)
    cache.remeasure("store")
    assert cache.total - before >= 5000 and "old" in cache
    store["more"] = sized(5000)
    cache.remeasure("store")
    assert "old" not in cache and cache.total == nbytes(store)
    cache.remeasure("gone")  # nothing


def test_after_work_follows_long_builds_long_changes_and_evictions_only():
    calls = []
    cache = ByteCache(1000, measure=measured, after_work=lambda: calls.append(1),
                      work_seconds=0.05)
    cache.get("quick", lambda: sized(100))
    cache.get("quick", lambda: pytest.fail("cached"))
    cache.remeasure("quick", worked=0.01)
    assert calls == []  # nothing worked long, nothing went
    cache.get("slow", lambda: time.sleep(0.06) or sized(100))
    assert len(calls) == 1
    cache.remeasure("slow", worked=0.2)  # a store that took long to gain entries
    assert len(calls) == 2
    cache.get("big", lambda: sized(950))  # quick, but quick and slow go
    assert len(calls) == 3 and cache.evictions == 2


class Planned:
    """A stand-in for memory.watch: each work "needs" the growth planned for it."""

    def __init__(self):
        self.growth, self.seconds = 0, 1.0

    def __call__(self):
        @contextmanager
        def watch():
            yield SimpleNamespace(growth=self.growth, seconds=self.seconds)

        return watch()


def test_work_is_given_the_room_its_kind_needed_before_it_starts():
    """A build first evicts down to the budget less the most its kind needed lately (an
    analysis needs far more while it runs than it keeps)."""
    planned = Planned()
    cache = ByteCache(1000, measure=measured, watch=planned)
    cache.get(("photo", 1), lambda: sized(200))
    planned.growth = 600  # what the first analysis needed while it ran
    cache.get(("analysis", 1), lambda: sized(100))
    assert cache.needed("analysis") == 600 and cache.needed("photo") == 0
    planned.growth = 0
    cache.get(("photo", 2), lambda: sized(200))
    assert cache.total == 500  # within the budget: nothing went so far

    def second():  # 500 + 600 > 1000: the least recent (photo 1) went before this ran
        assert [k for k, _ in cache.sizes()] == [("analysis", 1), ("photo", 2)]
        assert cache.reserved == 600
        cache.get("other session", lambda: sized(150))  # another store meanwhile: room kept
        assert ("analysis", 1) not in cache and cache.total + cache.reserved <= 1000
        return sized(100)

    cache.get(("analysis", 2), second)
    assert cache.reserved == 0 and cache.evictions == 2
    assert [k for k, _ in cache.sizes()] == [("photo", 2), "other session", ("analysis", 2)]


def test_room_for_work_is_not_made_by_dropping_what_a_running_script_still_holds():
    """Dropping a value someone still uses frees nothing (and costs its recomputation later):
    room is made from the values nobody else holds, including those freed by an earlier drop
    (a rollout that held its analysis)."""
    planned = Planned()
    cache = ByteCache(1000, measure=measured, watch=planned)
    in_use = cache.get(("photo", 1), lambda: sized(300))  # the running script's photo
    held = cache.get(("analysis", 1), lambda: sized(300))
    cache.get(("rollout", 1), held[:100].view)  # a view: it holds the analysis
    del held
    planned.growth = 700
    with cache.working("big"):
        pass
    with cache.working("big"):  # 700 + 700 > 1000: only the photo in use may stay
        assert [k for k, _ in cache.sizes()] == [("photo", 1)]
    assert cache.evictions == 2 and in_use.nbytes == 300


def test_a_store_beside_reserved_work_keeps_what_is_in_use_while_the_entries_fit_the_budget():
    """Another session stores while an analysis runs with room reserved for it: what a session
    shows stays (dropping it frees nothing, and its next interaction would compute it again
    while the old one lives); only values nobody holds make room for the reserved work. The
    entries alone stay within the budget, in use or not."""
    planned = Planned()
    cache = ByteCache(1000, measure=measured, watch=planned)
    shown = cache.get(("analysis", "a"), lambda: sized(300))  # on session a's screen
    cache.get(("photo", "old"), lambda: sized(200))  # nobody's
    planned.growth = 900
    with cache.working("analysis"):
        pass
    with cache.working("analysis"):  # session b's analysis: 900 set aside, the old photo went
        assert ("photo", "old") not in cache and cache.reserved == 900
        cache.get(("memo", "a"), lambda: sized(50))  # session a meanwhile
        assert ("analysis", "a") in cache and cache.total == 350
        cache.get("big", lambda: sized(800))  # nobody's memo made room; then 1100 > 1000
        assert [k for k, _ in cache.sizes()] == ["big"]  # without any reservation: a's went
    assert shown.nbytes == 300


def test_what_a_kind_needs_is_the_most_of_its_recent_work_and_lookups_do_not_count():
    planned = Planned()
    cache = ByteCache(10**6, measure=measured, watch=planned, work_seconds=0.5)
    planned.growth = 700
    cache.get(("analysis", 0), lambda: sized(1))
    planned.growth, planned.seconds = 5, 0.01  # quick: a lookup or a cheap value, not work
    with cache.working("analysis"):
        pass
    assert cache.needed("analysis") == 700
    planned.seconds = 1.0
    for i in range(HISTORY - 1):
        cache.get(("analysis", i + 1), lambda: sized(1))
    assert cache.needed("analysis") == 700  # still among the last HISTORY
    cache.get(("analysis", "one more"), lambda: sized(1))
    assert cache.needed("analysis") == 5
    planned.growth = 900
    with pytest.raises(ZeroDivisionError), cache.working("analysis"):
        raise ZeroDivisionError("failed half-way: it was work too")
    assert cache.needed("analysis") == 900 and cache.reserved == 0


def test_a_reading_shared_with_other_work_is_not_charged_to_either():
    """The resident size is the process's: work that overlapped other work measured both."""
    planned = Planned()
    cache = ByteCache(10**6, measure=measured, watch=planned)
    planned.growth = 300
    cache.get(("analysis", 1), lambda: sized(1))  # alone: counts
    planned.growth = 800
    with cache.working("rollout"):  # another session's analysis starts meanwhile
        cache.get(("analysis", 2), lambda: sized(1))
    assert cache.needed("analysis") == 300  # its reading alone stands
    assert cache.needed("rollout") == 800  # no reading alone yet: the shared one, for now
    planned.growth = 500
    with cache.working("rollout"), cache.working("photo"):
        pass
    assert cache.needed("rollout") == 500  # the least of the shared readings
    planned.growth = 200
    with cache.working("rollout"):
        pass
    assert cache.needed("rollout") == 200  # one alone replaces them


def test_the_page_cache_sets_aside_what_a_real_analysis_needed():
    """With the real watch (Linux): an R50 analysis of an official-size photo grows the
    resident memory by far more than it keeps, and the next one gets that room."""
    if memory.resident() is None:
        pytest.skip("reads /proc/self/statm (Linux): elsewhere the cache sets no room aside")
    model, image = recipe_model("detr_resnet50"), photo(1066, 800)
    memory.release()  # free pages the heap kept from earlier tests would hide the growth
    cache = ByteCache(10 * 2**30, work_seconds=0.0)
    kept = nbytes(cache.get(("analysis", 1), lambda: analyze(model, image)))
    assert cache.needed("analysis") > kept + 20 * MB


def test_a_failed_build_caches_nothing_and_the_next_caller_builds():
    cache = ByteCache(1000, measure=measured)
    with pytest.raises(ZeroDivisionError):
        cache.get("k", lambda: 1 / 0)
    assert "k" not in cache and cache.get("k", lambda: sized(5)).nbytes == 5


def test_concurrent_callers_of_one_key_build_it_once_and_other_keys_do_not_wait():
    cache = ByteCache(10**6, measure=measured)
    builds, release = [], threading.Event()

    def slow():
        builds.append(1)
        release.wait(10)
        return sized(100)

    with ThreadPoolExecutor(8) as pool:
        waiting = [pool.submit(cache.get, "slow", slow) for _ in range(6)]
        time.sleep(0.2)
        assert cache.get("fast", lambda: sized(1)).nbytes == 1  # while "slow" is building
        release.set()
        results = [f.result(10) for f in waiting]
    assert len(builds) == 1 and all(r is results[0] for r in results)


def test_sessions_on_threads_see_only_their_own_entries_and_the_budget_holds():
    """Eight 'sessions' on eight threads, each caching its own values under its own id with
    random sizes: every value read back is the session's own, and the accounting is exact."""
    budget = 200_000
    cache = ByteCache(budget, measure=measured)
    seen_other = []

    def session(sid: int) -> None:
        rng = random.Random(sid)
        for _ in range(400):
            key = ("memo", sid, rng.randrange(20))
            value = cache.get(key, lambda k=key: np.full(rng.randrange(1, 20_000), k[1],
                                                         np.uint16))
            if value[0] != sid:
                seen_other.append((sid, key))
            assert cache.total <= budget + 40_000  # at most one entry over, while it lands

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(session, range(8)))
    assert seen_other == []
    sizes = cache.sizes()
    assert cache.total == sum(size for _, size in sizes) <= budget
    assert len({k for k, _ in sizes}) == len(sizes) > 1


def test_an_evicted_analysis_and_its_rollout_are_freed_at_once_without_the_collector():
    """Why `runner.postScriptGC = false` can stay: the records hold no reference cycles, so
    reference counting frees an evicted entry's memory the moment the cache drops it."""
    cache = ByteCache(1, measure=nbytes)
    model = recipe_model("detr_resnet50")
    gc.collect()
    gc.disable()
    try:
        built = cache.get("analysis", lambda: analyze(model, photo(160, 96), short_side=96,
                                                      max_size=160))
        rolled = cache.get("rollout", functools.partial(explain.rollout, built))
        refs = [weakref.ref(built), weakref.ref(rolled)]
        del built, rolled
        cache.get("next", lambda: sized(1))  # evicts both
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()

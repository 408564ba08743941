"""Freed memory goes back to the system (glibc's malloc_trim), on a helper thread."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from detr_viz import memory

GLIBC = memory.available()


@pytest.mark.skipif(not GLIBC, reason="needs glibc's malloc_trim (Linux): on macOS, Windows "
                                      "and musl release() does nothing, by design, and their "
                                      "allocators return memory their own way")
def test_release_gives_back_the_free_pages_a_freed_heap_keeps():
    # In a fresh process: 300 MB of 100 KB blocks (under glibc's mmap threshold: they live in
    # the heap), all freed but the last (which pins the heap's top, so free() itself cannot
    # trim it). The resident memory stays up until release().
    script = textwrap.dedent("""
        from detr_viz import memory

        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096

        start = rss()
        blocks = [bytearray(100_000) for _ in range(3000)]
        for b in blocks:
            b[::4096] = b"x" * len(b[::4096])  # touch every page
        grown = rss()
        del blocks[:-1]
        freed = rss()
        assert memory.release()
        print(start, grown, freed, rss())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    start, grown, freed, released = map(int, out.split())
    assert grown - start > 250e6
    assert freed - start > 200e6  # free() alone kept most of it
    assert released - start < 50e6  # release() gave it back


def test_release_soon_trims_on_one_helper_thread_and_comes_back(monkeypatch):
    import threading

    done = threading.Event()
    threads = []

    def trim(pad):
        threads.append(threading.current_thread().name)
        done.set()
        return 1

    monkeypatch.setattr(memory, "_TRIM", trim)  # any platform: the thread logic alone
    for _ in range(5):
        memory.release_soon()
    assert done.wait(5)
    for _ in range(50):  # the worker ends once nothing more is wanted
        if memory._worker is None:
            break
        threading.Event().wait(0.05)
    assert memory._worker is None and set(threads) == {"detr-viz-trim"}
    assert 1 <= len(threads) <= 5
    done.clear()
    memory.release_soon()  # a later call starts a new worker
    assert done.wait(5)


def test_turned_off_by_the_environment():
    script = ("from detr_viz import memory; "
              "print(memory.available(), memory.release())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={"DETR_VIZ_MALLOC_TRIM": "0", "PATH": ""}).stdout
    assert out.split() == ["False", "False"]


PROC = memory.resident() is not None


@pytest.mark.skipif(not PROC, reason="reads /proc/self/statm (Linux): elsewhere watch() "
                                     "measures nothing and the cache sets no room aside")
def test_watch_sees_a_peak_that_is_gone_when_the_block_ends():
    import mmap
    import threading
    import time

    size = 200 * 2**20
    with memory.watch() as w:
        # fresh pages of their own (a malloc could reuse heap pages earlier tests left resident)
        block = mmap.mmap(-1, size)
        block[::mmap.PAGESIZE] = b"x" * (size // mmap.PAGESIZE)  # touch every page
        time.sleep(5 * memory.INTERVAL)
        block.close()  # unmapped: the resident memory is back down
        time.sleep(5 * memory.INTERVAL)
    assert 190 * 2**20 < w.growth < 260 * 2**20
    assert memory.resident() - w.start < 50 * 2**20  # the peak was seen while it lasted
    assert w.seconds >= 10 * memory.INTERVAL
    for _ in range(100):  # the sampler ends with the last watch
        if memory._sampler is None:
            break
        time.sleep(0.01)
    assert memory._sampler is None
    assert "detr-viz-watch" not in {t.name for t in threading.enumerate()}


def test_without_proc_a_watch_measures_nothing(monkeypatch):
    monkeypatch.setattr(memory, "resident", lambda: None)
    with memory.watch() as w:
        pass
    assert w.growth == 0 and memory._sampler is None


def test_module_bytes_counts_parameters_and_buffers_each_storage_once():
    conv = torch.nn.Conv2d(3, 8, 3)  # 8*3*3*3 + 8 floats
    norm = torch.nn.BatchNorm2d(8)  # weight, bias, mean, var (8 each) and a long counter
    tied = torch.nn.Linear(4, 4, bias=False)
    twin = torch.nn.Linear(4, 4, bias=False)
    twin.weight = tied.weight  # shared: once
    assert memory.module_bytes([conv]) == (216 + 8) * 4
    assert memory.module_bytes([conv, norm]) == (224 + 32) * 4 + 8
    assert memory.module_bytes([tied, twin, conv, conv]) == 16 * 4 + 224 * 4
    assert memory.module_bytes([]) == 0

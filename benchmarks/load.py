"""The page under load: several browser sessions at once, a long session, hostile uploads.

    python -m benchmarks.load                       # 4 sessions, 12 photos, budget 512M
    python -m benchmarks.load --sessions 2 --photos 6 --budget 2G
    python -m benchmarks.load --post-script-gc      # Streamlit's gc after every run, to compare

``streamlit run app.py`` serves on loopback through ``benchmarks/timed_server.py`` (which logs
every script run and the bytes the page's cache holds after it) with the planted stand-in
weights; its resident memory is sampled from /proc every 0.2 s. Debian's chromium, driven by
Playwright's async API (never ``playwright install``), one browser context per session:

1. concurrent: ``--sessions`` sessions at once, each dropping its own photo (1 MP JPEG, 12 MP
   JPEG, a 12 MP portrait stored sideways with an EXIF rotation, a PNG with transparency, ...),
   then clicking three points, switching to rollout, moving the threshold and switching to DC5;
   each checks that its page names its own photo (and no other session's) after every step;
2. long: one session dropping ``--photos`` different photos (1 to 12 MP) in a row, one click
   each;
3. hostile: one session dropping files a user could: not an image, empty, truncated, a PNG
   claiming 121 MP, 1x1, 2x5000, 20000x100, clicked on every corner where a photo shows.

Prints, per phase: errors (a crash is "Something went wrong" or a traceback; a clear message
about a bad file is not an error), time to the first heatmaps per session (drop -> settled
page), server RSS at the start of the phase (the tabs of the one before closed 3 s earlier),
at its end and its peak (from its start), and the cache's bytes against its budget. Sizes are
the server's; the browser is another process.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import struct
import threading
import time
import zlib
from contextlib import asynccontextmanager
from pathlib import Path

from PIL import Image

from benchmarks.common import photo_jpeg, photo_like, print_header, stand_in_weights, table
from benchmarks.page import CHROMIUM, FLAGS, SETTLED, Server

ROOT = Path(__file__).resolve().parents[1]
CRASH = "Something went wrong"
NEW_OUTCOME = """([name, before]) => {
  const alert = document.querySelector("[data-testid='stAlertContentError']");
  return document.body.innerText.includes(name + ": ") || (alert && alert.innerText !== before);
}"""  # the dropped file's caption, or an error other than the one shown before the drop
MB = 2**20
CLOSED_WAIT = 3.0  # s after closing a phase's tabs: Streamlit has disconnected their sessions


class Memory:
    """The server's RSS, sampled in a thread: ``peak`` since the last ``mark``, and ``now``."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.stop = pid, 0, False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def now(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def mark(self) -> int:
        peak, self.peak = self.peak, self.now()
        return peak

    def _sample(self) -> None:
        while not self.stop:
            try:
                self.peak = max(self.peak, self.now())
            except OSError:
                return
            time.sleep(0.2)


# ----------------------------------------------------------------------------- photos


def save(image: Image.Image, path: Path, **options) -> Path:
    if not path.exists():
        image.save(path, **options)
    return path


def own_photos(folder: Path, n: int) -> list[Path]:
    """A different photo for each concurrent session."""
    kinds = [
        lambda p: save(photo_like(1152, 864, 1), p / "s1_1mp.jpg", quality=90),
        lambda p: photo_jpeg("12MP"),
        lambda p: save(photo_like(4032, 3024, 3), p / "s3_portrait_exif.jpg", quality=90,
                       exif=_rotated()),
        lambda p: save(_transparent(photo_like(1600, 1200, 4)), p / "s4_alpha.png"),
    ]
    out = [kinds[i % len(kinds)](folder) for i in range(n)]
    return [p if i < len(kinds) else save(photo_like(1280, 960, 10 + i), folder / f"s{i}.jpg",
                                          quality=90) for i, p in enumerate(out)]


def long_photos(folder: Path, n: int) -> list[Path]:
    sizes = [(1024, 768), (2048, 1536), (4032, 3024), (3024, 4032), (1600, 1200), (2592, 1944)]
    return [save(photo_like(*sizes[i % len(sizes)], seed=100 + i), folder / f"long{i:02d}.jpg",
                 quality=88) for i in range(n)]


def hostile_files(folder: Path) -> list[Path]:
    jpeg = photo_jpeg((1024, 768)).read_bytes()
    files = {
        "not_a_photo.jpg": b"this is not a photo",
        "empty.png": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "bomb_121mp.png": real_png_bomb(11000, 11000),
        "one_pixel.png": _png(Image.new("RGB", (1, 1), (200, 40, 40))),
        "strip_2x5000.png": _png(Image.new("RGB", (2, 5000), (40, 120, 200))),
        "strip_20000x100.png": _png(photo_like(20000, 100, 6)),
        "clear.png": _png(Image.new("RGBA", (640, 480), (0, 0, 0, 0))),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


def real_png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of zeros: a few KB that would decode to width * height * 3 bytes."""
    row = b"\0" + bytes((width + 7) // 8)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(row * height, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _rotated() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the viewer rotates it 90 degrees clockwise
    return exif


def _transparent(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    alpha = Image.linear_gradient("L").resize(image.size)
    rgba.putalpha(alpha)
    return rgba


# ----------------------------------------------------------------------------- sessions


class Session:
    """One browser context on the server: a Streamlit session of its own."""

    def __init__(self, name: str, page, others: list[str]):
        self.name, self.page, self.others = name, page, others
        self.errors: list[str] = []
        self.first: list[float] = []
        self.notes: list[str] = []

    async def settle(self) -> None:
        await asyncio.sleep(0.3)
        await self.page.wait_for_function(SETTLED, timeout=600_000)
        await asyncio.sleep(0.2)

    async def check(self, step: str, photo: str | None = None) -> None:
        text = await self.page.inner_text("body")
        if CRASH in text or await self.page.locator("[data-testid='stException']").count():
            self.errors.append(f"{step}: crash")
        if photo is not None:
            if f"{photo}: " not in text:
                self.errors.append(f"{step}: own photo {photo} not shown")
            seen = [o for o in self.others if o != photo and f"{o}: " in text]
            if seen:
                self.errors.append(f"{step}: shows another session's photo {seen}")

    async def drop(self, path: Path) -> str:
        """Drop ``path``; the time to the settled page, or a message the page showed."""
        caption = self.page.get_by_text(f"{path.name}: ").first
        alert = self.page.locator("[data-testid='stAlertContentError']").first
        before = await alert.inner_text() if await alert.count() else None
        start = time.perf_counter()
        await self.page.locator("input[type=file]").set_input_files(str(path))
        await self.page.wait_for_function(NEW_OUTCOME, arg=[path.name, before], timeout=600_000)
        await self.settle()
        if await caption.count() and await self.page.locator(".js-plotly-plot").count():
            self.first.append(time.perf_counter() - start)
            return "shown"
        return (await alert.inner_text()).splitlines()[0][:90] if await alert.count() else "?"

    async def click(self, fx: float, fy: float) -> None:
        frame = self.page.frame_locator("iframe[title*='streamlit_image_coordinates']")
        image = frame.locator("#image")
        box = await image.bounding_box()
        x = min(int(box["width"] * fx), int(box["width"]) - 1)
        y = min(int(box["height"] * fy), int(box["height"]) - 1)
        await image.click(position={"x": max(x, 0), "y": max(y, 0)})
        await self.settle()

    async def radio(self, option: str) -> None:
        await self.page.get_by_text(option, exact=True).first.click()
        await self.settle()

    async def threshold_down(self) -> None:
        thumb = self.page.get_by_role("slider", name="Confidence threshold")
        await thumb.focus()
        await thumb.press("ArrowLeft")
        await self.settle()


async def open_session(browser, url: str, name: str, others: list[str]) -> Session:
    context = await browser.new_context(viewport={"width": 1400, "height": 2400})
    page = await context.new_page()
    await page.goto(url)
    await page.wait_for_selector(".js-plotly-plot", timeout=600_000)
    session = Session(name, page, others)
    await session.settle()
    return session


async def explore(session: Session, photo: Path) -> None:
    """One user with one photo: drop, clicks, rollout, threshold, DC5, a click."""
    await session.drop(photo)
    await session.check("drop", photo.name)
    for step, action in [("click", lambda: session.click(0.2, 0.3)),
                         ("click", lambda: session.click(0.7, 0.6)),
                         ("rollout", lambda: session.radio("rollout")),
                         ("threshold", session.threshold_down),
                         ("threshold", session.threshold_down),
                         ("DC5", lambda: session.radio("DC5 (stride 16)")),
                         ("click", lambda: session.click(0.5, 0.5))]:
        await action()
        await session.check(step, photo.name)


async def long_session(session: Session, photos: list[Path], memory: Memory,
                       server: Server, trail: list[str]) -> None:
    """Drop each photo and click once; ``trail`` gets "RSS/cache MiB" after each."""
    for i, photo in enumerate(photos):
        await session.drop(photo)
        await session.click(0.3 + 0.05 * (i % 8), 0.4)
        await session.check(f"photo {i}", photo.name)
        cache = server.records()[-1].get("cache_bytes", 0)
        trail.append(f"{memory.now() / MB:.0f}/{cache / MB:.0f}")


async def hostile(session: Session, files: list[Path], rows: list[list[str]]) -> None:
    """Drop each file (clicking the corners of any that shows); ``rows`` gets each outcome."""
    for path in files:
        outcome = await session.drop(path)
        if outcome == "shown":
            for corner in [(0, 0), (1, 0), (0, 1), (1, 1), (0.5, 1)]:
                await session.click(*corner)
        await session.check(path.name)
        rows.append([path.name, f"{path.stat().st_size / 1024:.0f} KiB", outcome])


@asynccontextmanager
async def phase_failure(session: Session, work: Path, name: str):
    """A phase that fails (the benchmark's own timeout, say) is an error of its session, with a
    screenshot of its page, and the run goes on to the next phase."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - reported as the phase's error, not hidden
        shot = work / f"failed-{name}-{os.getpid()}.png"
        await session.page.screenshot(path=str(shot), full_page=True)
        session.errors.append(f"{type(error).__name__}: {str(error).splitlines()[0][:120]} "
                              f"(screenshot {shot})")


# ----------------------------------------------------------------------------- run


async def run(args, server: Server, memory: Memory, work: Path) -> None:
    from playwright.async_api import async_playwright

    rows, budget = [], None
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        first = await open_session(browser, server.url, "warm-up", [])
        await first.page.context.close()
        start_rss = memory.now()
        memory.mark()
        start_models = max((r.get("model_bytes", 0) for r in server.records()), default=0)
        phase_began, phase_rss = time.time(), start_rss

        async def closed(sessions: list[Session]) -> None:
            """Close the phase's tabs; the next phase starts once the server has seen them go
            (its peak counts from then, and its RSS then is shown)."""
            nonlocal phase_rss
            for s in sessions:
                await s.page.context.close()
            await asyncio.sleep(CLOSED_WAIT)
            phase_rss = memory.now()
            memory.mark()

        def row(phase: str, sessions: list[Session], note: str = "") -> None:
            nonlocal budget, phase_began
            records = [r for r in server.records() if r["wall"] >= phase_began]
            phase_began = time.time()
            cache = max((r.get("cache_bytes", 0) for r in records), default=0)
            models = max((r.get("model_bytes", 0) for r in records), default=0)
            budget = next((r["cache_budget"] for r in records if "cache_budget" in r), None)
            # the goal: the server stays under what it took without models, plus the models
            # loaded (R50 at the start; DC5 too once a session switched), plus the budget
            limit = start_rss - start_models + models + (budget or 0)
            end, peak = memory.now(), memory.mark()
            firsts = ", ".join(f"{t:.1f}" for s in sessions for t in s.first[:1]) or "-"
            errors = [e for s in sessions for e in s.errors]
            print(f"{phase}: end {end / MB:.0f} MiB, peak {peak / MB:.0f} MiB, limit "
                  f"{limit / MB:.0f} MiB, cache peak {cache / MB:.0f} MiB, errors {errors}",
                  flush=True)  # as it happens: a later phase may fail
            rows.append([phase, str(len(errors)) + (f" ({'; '.join(errors[:3])})" if errors
                                                     else ""),
                         firsts, f"{phase_rss / MB:.0f} MiB", f"{end / MB:.0f} MiB",
                         f"{peak / MB:.0f} MiB",
                         f"{limit / MB:.0f} MiB ({models / MB:.0f} of models)",
                         f"{(end - limit) / MB:+.0f} / {(peak - limit) / MB:+.0f} MiB",
                         f"{cache / MB:.0f} MiB", note])

        photos = own_photos(work, args.sessions)
        names = [p.name for p in photos]
        sessions = [await open_session(browser, server.url, f"s{i}", names)
                    for i in range(args.sessions)]
        await asyncio.gather(*(explore(s, ph) for s, ph in zip(sessions, photos, strict=True)))
        for s, ph in zip(sessions, photos, strict=True):  # after all: still their own photos
            await s.threshold_down()
            await s.check("final", ph.name)
        row(f"{args.sessions} sessions at once", sessions,
            "each: drop, 3 clicks, rollout, threshold x2, DC5")
        await closed(sessions)

        long = await open_session(browser, server.url, "long", [])
        trail: list[str] = []
        async with phase_failure(long, work, "long"):
            await long_session(long, long_photos(work, args.photos), memory, server, trail)
        row(f"1 session, {args.photos} photos", [long], "RSS/cache MiB after each photo: "
            + " ".join(trail))
        await closed([long])

        bad = await open_session(browser, server.url, "hostile", [])
        outcomes: list[list[str]] = []
        async with phase_failure(bad, work, "hostile"):
            await hostile(bad, hostile_files(work), outcomes)
        row("hostile uploads", [bad], f"{len(outcomes)} files")
        await browser.close()
    print(f"Server RSS after start and one page (R50 loaded): {start_rss / MB:.0f} MiB, of "
          f"which models {start_models / MB:.0f} MiB; "
          f"cache budget: {budget / MB:.0f} MiB\n" if budget else "no byte cache\n")
    print("limit: the RSS after start less its models, plus the models loaded during the phase, "
          "plus the budget\n")
    print(table(["phase", "errors", "first heatmaps per session (s)", "RSS at start",
                 "RSS at end",
                 "peak RSS", "limit", "end / peak - limit", "cache peak", "what"], rows) + "\n")
    print(table(["hostile file", "size", "what the page showed"], outcomes) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--photos", type=int, default=12)
    parser.add_argument("--budget", default="512M", help="DETR_VIZ_CACHE_BYTES for the server")
    parser.add_argument("--post-script-gc", action="store_true",
                        help="Streamlit's full gc after every script run (config.toml: off)")
    args = parser.parse_args(argv)
    if CHROMIUM is None:
        raise SystemExit("needs Debian's chromium: apt-get install -y chromium")
    print_header("The page under load: sessions at once, a long session, hostile uploads")
    print(f"budget {args.budget}, postScriptGC {args.post_script_gc}\n")
    weights = stand_in_weights()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "detr-viz-load"
    work.mkdir(exist_ok=True)
    log = work / f"runs-{os.getpid()}.jsonl"
    os.environ["DETR_VIZ_CACHE_BYTES"] = args.budget
    extra = ["--runner.postScriptGC", "true"] if args.post_script_gc else []
    server = Server(ROOT, weights, log, extra)
    memory = Memory(server.proc.pid)
    start = time.perf_counter()
    try:
        asyncio.run(run(args, server, memory, work))
        print(f"Whole run: {time.perf_counter() - start:.0f} s")
    finally:
        memory.stop = True
        server.close()
        log.unlink(missing_ok=True)


if __name__ == "__main__":
    main()

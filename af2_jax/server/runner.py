"""The engine behind the server: one thread drives it (the engine has no thread of its own), the event loop submits
and cancels, and each request's tokens come back to the loop through its own queue.

A failure inside a step (a bug, the device out of memory) ends the requests in flight with an error, is logged with
its traceback, and the engine is built again, so the server keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from typing import Callable

import numpy as np

from af2_jax.engine import WINDOW_BUCKETS, Completion, Engine, Handle, Request, Sampling, bucket_prompt

log = logging.getLogger(__name__)

WARMUP_LEVELS = ("none", "min", "all")
MIN_WARMUP_PROMPTS = (16, 32, 64)


class EngineFailed(RuntimeError):
    """The engine failed while this request was in flight (the server log has the traceback)."""


class Stream:
    """One request in flight as the event loop sees it: `next()` gives its new tokens (lists) as they come, then
    its `Completion`."""

    def __init__(self, runner: EngineRunner, loop: asyncio.AbstractEventLoop):
        self.runner, self.loop = runner, loop
        self.handle: Handle | None = None
        self._events: asyncio.Queue = asyncio.Queue()

    def _put(self, event) -> None:  # from the driving thread
        self.loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def next(self, timeout: float) -> list[int] | Completion:
        """The next event within `timeout` seconds (TimeoutError otherwise); EngineFailed if the engine failed."""
        event = await asyncio.wait_for(self._events.get(), timeout)
        if isinstance(event, EngineFailed):
            raise event
        return event

    def cancel(self) -> None:
        """Ends the request at the engine's next step (its slot is freed); nothing more is delivered."""
        self.runner.cancel(self)


class EngineRunner:
    """Owns the engine and the thread that drives it; `make_engine()` builds the engine (again after a failure).
    `background_compile`: the engine's model is in the stacked form; the first warm-up shape is served on it and the
    rest compile for the serving form in the background (`Engine.compile_serving_form`)."""

    def __init__(self, make_engine: Callable[[], Engine], *, warmup: str = "min", background_compile: bool = False):
        if warmup not in WARMUP_LEVELS:
            raise ValueError(f"warmup must be one of {', '.join(WARMUP_LEVELS)}, got {warmup!r}")
        self.make_engine, self.warmup, self.background_compile = make_engine, warmup, background_compile
        self.engine = make_engine()
        if background_compile and not (self.engine.model.scan_layers and self._programs()):
            raise ValueError("background compilation needs a model in the stacked form and a warm-up "
                             f"(got {'stacked' if self.engine.model.scan_layers else 'list'} layers, warmup "
                             f"{warmup!r})")
        self.ready = threading.Event()  # warm-up done
        self._open: set[Stream] = set()
        self._swap = threading.Lock()  # submit vs. replacing a failed engine
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="af2-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        self.engine.stop_compiling()

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> Stream:
        """Queues `request` (EngineFull when the queue is full, ValueError when it cannot be served)."""
        stream = Stream(self, loop)
        with self._swap:
            self._open.add(stream)  # before the engine has it: the driving thread may finish it at once
            try:
                stream.handle = self.engine.submit(request, on_token=stream._put,
                                                   on_done=functools.partial(self._finished, stream))
            except BaseException:
                self._open.discard(stream)
                raise
        self._wake.set()
        return stream

    def cancel(self, stream: Stream) -> None:
        with self._swap:
            if stream in self._open:
                self._open.discard(stream)
                self.engine.cancel(stream.handle)
        self._wake.set()

    @property
    def waiting(self) -> int:
        return self.engine.waiting

    @property
    def busy(self) -> int:
        return self.engine.busy

    def _finished(self, stream: Stream, completion: Completion) -> None:
        self._open.discard(stream)
        stream._put(completion)

    def _run(self) -> None:
        try:
            self._warm_up()
        except Exception:  # noqa: BLE001  (a failed warm-up is a failed step: logged, and serving goes on)
            self._recover()
        self.ready.set()
        while not self._stopping.is_set():
            self._wake.clear()
            if self.engine.idle and not self.engine.switch_pending:  # an idle engine still switches forms
                self._wake.wait(0.5)
                continue
            try:
                self.engine.step()
            except Exception:  # noqa: BLE001
                self._recover()

    def _recover(self) -> None:
        log.exception("the engine failed; the requests in flight end with an error and the engine is built again")
        self.engine.stop_compiling()
        with self._swap:
            failed, self._open = self._open, set()
            self.engine = self.make_engine()
        if self.background_compile and self.engine.model.scan_layers:  # it failed before switching
            self._compile_serving_form()
        for stream in failed:
            stream._put(EngineFailed("the engine failed while serving this request; see the server log"))

    def _warm_up(self) -> None:
        """Compiles what the first requests need by serving one request per shape (`warmup_programs`), each listed
        with its time. A model in the stacked form serves the first shape only, then compiles the rest for the
        serving form in the background (`Engine.compile_serving_form`): its first answer comes after the stacked
        form's short compilation, and the engine switches to the serving form once that is compiled."""
        engine = self.engine
        programs = self._programs()
        if not programs:
            return
        start = time.perf_counter()
        for windows, prompt, requests in programs[:1] if self.background_compile else programs:
            begun = time.perf_counter()
            engine.run([warmup_request(engine, windows, prompt) for _ in range(requests)])
            what = f"{windows} window(s)" if windows else "no audio"
            log.info("warm-up: %s, prompt bucket %d, %d request(s): %.1f s", what, prompt, requests,
                     time.perf_counter() - begun)
        if self.background_compile:
            log.info("warm-up (%s): first answer in %.1f s from the stacked layers; the serving form's %d shapes "
                     "compile in the background", self.warmup, time.perf_counter() - start, len(programs))
            self._compile_serving_form()
            return
        log.info("warm-up (%s) done in %.1f s, %d compiled programs (regrouping rows compiles on first use)",
                 self.warmup, time.perf_counter() - start, engine.programs.count)

    def _programs(self) -> list[tuple[int, int, int]]:
        return warmup_programs(self.warmup, self.engine.max_len, self.engine.row_buckets)

    def _compile_serving_form(self) -> None:
        engine = self.engine
        engine.compile_serving_form([(windows, prompt, engine.rows_for(requests))
                                     for windows, prompt, requests in self._programs()], on_ready=self._wake.set)


def warmup_programs(level: str, max_len: int, row_buckets: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """`(windows, prompt bucket, requests at once)` to serve at start-up: every `warmup_shapes` pair alone, then
    every larger row bucket's worth of requests at the first pair's prompt, for each window bucket warmed."""
    shapes = warmup_shapes(level, max_len)
    if not shapes:
        return []
    groups = [(windows, shapes[0][1], rows) for windows in sorted({w for w, _ in shapes if w})
              for rows in row_buckets[1:]]
    return [(windows, prompt, 1) for windows, prompt in shapes] + groups


def warmup_shapes(level: str, max_len: int) -> list[tuple[int, int]]:
    """(window bucket, prompt bucket) pairs to serve once at start-up, alone and then (at the first prompt bucket)
    as a group of every row bucket; 0 windows is a question without audio (its blank K/V program). `min`: one window
    and prompts up to 64; `all`: every window bucket by every prompt bucket that fits `max_len` (groups of mixed
    widths still compile on first use)."""
    prompts = sorted({min(bucket_prompt(n), max_len) for n in range(1, max_len - 1)})
    if level == "min":
        return [(1, p) for p in prompts if p in MIN_WARMUP_PROMPTS] + [(0, prompts[0])]
    if level == "all":
        return [(w, p) for w in WINDOW_BUCKETS for p in prompts] + [(0, prompts[0])]
    return []


def warmup_request(engine: Engine, windows: int, prompt: int) -> Request:
    """A request of `windows` silent windows whose prompt falls in bucket `prompt` and that decodes one step."""
    tokens, samples = engine.config.tokens, engine.config.audio.window_samples
    length = min(prompt, engine.max_len - 2)
    ids = ([tokens.media] if windows else []) + [tokens.pad] * length
    audio = (np.zeros((windows, samples), np.float32), np.ones((windows,), np.float32)) if windows else None
    return Request(ids[:length], audio, Sampling(max_new_tokens=2, ignore_eos=True))

"""The one accelerator check: af2-jax's speed on the device it finds, phase by phase, each phase's JSON written to
OUT as it finishes (so a run cut short keeps what it measured).

    python bench/device_check.py --out bench/results/device          # every phase, af2-3b, ~6 minutes on an H100
    python bench/device_check.py --out /tmp/dc --phases decode,compile
    python bench/device_check.py --out /tmp/dc --dry-run             # a tiny model on this CPU, seconds

Phases, in order of value:
1. `decode`: the engine in the serving layout (one buffer per layer), random bfloat16 weights drawn on the device,
   12 windows per request, at 1 and 8 slots: decode tokens/s (median of 3 runs after a compiling run) and the
   fraction of the HBM roofline = bytes one step must read (every LM weight a step uses, the cross-attention K/V and
   the text cache of every row) x steps/s / the device's bandwidth.
2. `int8`: phase 1 with int8 weights (`af2_jax.nn.quant`, the same random weights quantized), its speed-up over
   bfloat16 at each slot count, and how many greedy tokens equal bfloat16's.
3. `compile`: the serving programs' compile seconds, cold (an empty persistent cache, phase 1's first run) and warm
   (in-memory caches cleared, programs read back from the persistent cache), per program kind; and the stacked
   layers' programs for the same shapes, cold: what `serve --background-compile` waits for before its first answer.
4. `encode`: the audio path (HTSAT, audio transformer, every layer's cross-attention K/V) in windows/s.
5. `slots32`: decode as phase 1 at 32 slots.
6. `train`: one `sft` train step (trainable: audio encoder, audio transformer, cross-attention, embedding) at a fixed
   batch of 4 with remat, tokens/s and MFU = (6 x trainable + 4 x frozen-on-the-backward-path parameters) x tokens/s
   / the device's peak bf16 dense FLOP/s. Counted per text token: the cross-attention blocks and the tied
   embedding (its output projection) as trainable, the LM decoder layers as frozen on the backward path (the
   gradient reaches the first layer's cross-attention through them). Not counted: the audio encoder and audio
   transformer (their work is per window, not per token) and attention's sequence-length terms, so MFU is a floor.
7. `plan`: `python -m af2_jax.plan`'s per-device prediction for phase 1's 8-slot serving configuration against the
   device's measured peak memory.

Imports only jax, flax, optax and numpy besides af2_jax (a GPU image with `pip install --no-deps -e .` runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # for train_step.make_batch, the train benchmark's batch

from af2_jax.config import AF2Config, preset  # noqa: E402
from af2_jax.engine import Engine, EnginePrograms, Request, Sampling, bucket_prompt, bucket_windows  # noqa: E402
from af2_jax.nn.af2 import AF2Model  # noqa: E402
from af2_jax.planning import PlanRequest, plan_serving  # noqa: E402
from af2_jax.training.config import OptimSection  # noqa: E402
from af2_jax.training.step import TrainState, make_train_step, optimizer, split_model  # noqa: E402
from train_step import make_batch  # noqa: E402

PHASES = ("decode", "int8", "compile", "encode", "slots32", "train", "plan")

# Memory bandwidth (bytes/s) and peak dense bf16 FLOP/s by device kind (vendor data sheets); the first match wins.
DEVICE_SPECS = (
    ("H100 PCIe", 2.0e12, 756e12), ("H100", 3.35e12, 989e12), ("H200", 4.8e12, 989e12),
    ("A100", 2.039e12, 312e12), ("TPU v6", 1.64e12, 918e12), ("TPU v5 lite", 0.819e12, 197e12),
    ("TPU v5e", 0.819e12, 197e12), ("TPU v5", 2.765e12, 459e12), ("TPU v4", 1.2e12, 275e12),
)


@dataclasses.dataclass(frozen=True)
class Setup:
    """The sizes a run measures: the released af2-3b for a device, a tiny model for `--dry-run`."""

    windows: int = 12
    prompt: int = 24
    new: int = 32
    slots: tuple[int, ...] = (1, 8)
    many_slots: int = 32
    train_batch: int = 4
    train_tokens: int = 512
    train_windows: int = 12
    trainable: str = "sft"
    repeats: int = 3


DEVICE_SETUP = Setup()
# The dry run checks every phase's code on a CPU in seconds: one slot count (the 32-slot phase too), and training
# only the cross-attention (the audio encoder's backward pass alone would take half a minute to compile there).
DRY_SETUP = Setup(windows=1, prompt=8, new=4, slots=(2,), many_slots=2, train_batch=2, train_tokens=32,
                  train_windows=1, trainable=r"^layers\.xattn\.", repeats=1)


def device_spec(kind: str) -> tuple[float | None, float | None]:
    for name, bandwidth, flops in DEVICE_SPECS:
        if name.lower() in kind.lower():
            return bandwidth, flops
    return None, None


def config_for(dry_run: bool):
    if dry_run:  # the embedded demo model's sizes, one LM layer: a tiny AF2 with the real vocabulary
        data = json.loads((REPO / "af2_jax" / "demo_model" / "config.json").read_text())
        data.pop("af2_jax", None)
        data.pop("model_type", None)
        config = AF2Config.from_dict(data)
        return dataclasses.replace(config, lm=dataclasses.replace(config.lm, num_layers=1))
    return preset("af2-3b")


def abstract_model(config, dtype, *, scan_layers: bool, param_dtype=None):
    """`(graphdef, state)` of an AF2Model whose values are `jax.ShapeDtypeStruct`s (no memory)."""
    return nnx.split(nnx.eval_shape(lambda: AF2Model(config, dtype=dtype, param_dtype=param_dtype or dtype,
                                                     rngs=nnx.Rngs(0), scan_layers=scan_layers)))


def random_model(config, dtype, *, scan_layers: bool, param_dtype=None):
    """An AF2Model with random weights drawn on the default device (no host copy of the weights)."""
    graphdef, state = abstract_model(config, dtype, scan_layers=scan_layers, param_dtype=param_dtype)
    on_host = jax.default_backend() == "cpu"  # the device is the host: numpy draws faster than compiled programs
    rng, key = np.random.default_rng(0), jax.random.key(0)
    for n, (_, var) in enumerate(nnx.to_flat_state(state)):
        shape = tuple(var.shape)
        if isinstance(var, nnx.BatchStat):
            value = jnp.full(shape, 100.0 if len(shape) else 1.0, var.dtype)
        elif len(shape) < 2:
            value = jnp.ones(shape, var.dtype)
        elif on_host:
            value = jnp.asarray((rng.standard_normal(shape, np.float32) / np.sqrt(shape[-1])).astype(var.dtype))
        else:
            value = _device_normal(jax.random.fold_in(key, n), shape, var.dtype)
        var.set_value(value)
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _device_normal(key, shape, dtype):
    """Weights drawn where they will live (no host copy): one small program per distinct (shape, dtype), a few dozen
    for a model whose layers repeat the same shapes."""
    return (jax.random.normal(key, shape, jnp.float32) / np.sqrt(shape[-1])).astype(dtype)


def step_bytes(model, rows: int, windows: int, length: int) -> int:
    """Bytes one decoding step must read: every LM weight it uses (the layers without the cross-attention's to_kv,
    whose K/V are computed once per request; the final norm; the tied embedding as output projection), and per row
    every layer's cross-attention K/V and text KV cache."""

    weights = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = ".".join(map(str, path))
        if name.startswith(("layers.", "norm.", "embed_tokens.")) and ".to_kv." not in name:
            weights += int(np.prod(var.shape)) * var.dtype.itemsize
    cfg = model.config
    itemsize = np.dtype(model.dtype).itemsize
    media = bucket_windows(windows) * cfg.htsat.tokens_per_window
    per_row = cfg.lm.num_layers * 2 * (cfg.cross_attention.heads * media * cfg.cross_attention.dim_head
                                       + cfg.lm.num_kv_heads * length * cfg.lm.head_dim)
    return weights + rows * per_row * itemsize


def requests(config, count: int, setup: Setup, new: int):

    rng = np.random.default_rng(0)
    t = np.arange(config.audio.window_samples) / config.audio.sample_rate
    out = []
    for k in range(count):
        audio = np.stack([0.5 * np.sin(2 * np.pi * (200 + 37 * k + 29 * w) * t) for w in range(setup.windows)])
        ids = rng.integers(0, config.tokens.eos, setup.prompt).tolist()
        ids[0], ids[-1] = config.tokens.media, config.tokens.sep
        out.append(Request(ids, (audio.astype(np.float32), np.ones(setup.windows, np.float32)),
                           Sampling(max_new_tokens=new, ignore_eos=True)))
    return out


def timed_runs(engine, batch, repeats: int) -> tuple[list[dict], list[list[int]]]:
    """Each run's timing differences (the engine's counters), the first one compiling, and the last run's tokens."""
    runs = []
    for _ in range(repeats + 1):
        before = dict(engine.timings)
        done = engine.run(batch)
        runs.append({k: engine.timings[k] - before[k] for k in before})
    return runs, [completion.tokens for completion in done]


def memory() -> dict:
    """The device's bytes in use now and at the peak so far (since the process started: the peak cannot be reset, so
    a phase's own peak is only bounded by it)."""
    stats = jax.devices()[0].memory_stats() or {}
    return {"bytes_in_use": stats.get("bytes_in_use"), "peak_bytes_in_use": stats.get("peak_bytes_in_use")}


class Check:
    """One run: the device, the model, the phases' results (each also written to OUT/<phase>.json)."""

    def __init__(self, out: Path, dry_run: bool):
        
        self.out, self.dry_run = out, dry_run
        self.setup = DRY_SETUP if dry_run else DEVICE_SETUP
        device = jax.devices()[0]
        self.device = {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count(),
                       "jax": jax.__version__}
        self.bandwidth, self.peak_flops = device_spec(device.device_kind)
        self.config = config_for(dry_run)
        self.dtype = jnp.bfloat16
        self._model = None
        self.results: dict[str, dict] = {}
        self.tokens: dict[int, list[list[int]]] = {}  # the last decode run's greedy tokens, by slot count

    @property
    def model(self):
        if self._model is None:
            start = time.perf_counter()
            self._model = random_model(self.config, self.dtype, scan_layers=False)
            self.results.setdefault("_model", {"init_s": time.perf_counter() - start})
        return self._model

    def write(self, phase: str, result: dict) -> None:
        result = {"phase": phase, "device": self.device, "dry_run": self.dry_run, **result, **memory()}
        self.results[phase] = result
        (self.out / f"{phase}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"[{phase}] " + json.dumps({k: v for k, v in result.items() if k not in ("device", "phase")}),
              flush=True)

    def _engine(self, slots: int):
        setup = self.setup
        return Engine(self.model, slots=slots, max_len=setup.prompt + setup.new, max_windows=setup.windows,
                      max_pending=max(64, slots))

    def decode_at(self, slots: int) -> dict:
        setup = self.setup
        engine = self._engine(slots)
        runs, self.tokens[slots] = timed_runs(engine, requests(self.config, slots, setup, setup.new), setup.repeats)
        decode_s = statistics.median(r["decode_s"] for r in runs[1:])
        steps_per_s = setup.new / decode_s
        nbytes = step_bytes(self.model, slots, setup.windows, setup.prompt + setup.new)
        result = {"slots": slots, "windows": setup.windows, "prompt": setup.prompt, "new_tokens": setup.new,
                  "decode_tokens_per_s": slots * steps_per_s, "step_ms": 1e3 / steps_per_s,
                  "step_bytes": nbytes, "achieved_bytes_per_s": nbytes * steps_per_s,
                  "roofline_fraction": nbytes * steps_per_s / self.bandwidth if self.bandwidth else None,
                  "encode_s": statistics.median(r["encode_s"] for r in runs[1:]),
                  "prefill_s": statistics.median(r["prefill_s"] for r in runs[1:]),
                  "first_run_compile_s": runs[0]["compile_s"],
                  "compile_s_by_kind": dict(engine.programs.compile_s_by_kind),
                  "programs": sorted({key[0] for key in engine.programs.keys()})}
        return result

    def decode(self) -> dict:
        return {"runs": [self.decode_at(slots) for slots in self.setup.slots]}

    def compile(self) -> dict:
        """Cold: phase 1's first runs (the persistent cache starts empty); warm: a new engine after clearing JAX's
        in-memory caches, so every program comes back from the persistent cache."""
    
        cold = {f"slots{r['slots']}": r["first_run_compile_s"] for r in self.results.get("decode", {}).get("runs", [])}
        warm = {}
        for slots in self.setup.slots:
            jax.clear_caches()
            engine = self._engine(slots)
            runs, _ = timed_runs(engine, requests(self.config, slots, self.setup, self.setup.new), 0)
            warm[f"slots{slots}"] = {"total": runs[0]["compile_s"],
                                     "by_kind": dict(engine.programs.compile_s_by_kind)}
        stacked = {}
        graphdef, state = abstract_model(self.config, self.dtype, scan_layers=True)
        max_len = self.setup.prompt + self.setup.new  # as `_engine`'s, whose prompt buckets stop there
        for slots in self.setup.slots:
            programs = EnginePrograms(graphdef, self.config)
            programs.for_shapes(state, dtype=self.dtype, slots=slots, windows=bucket_windows(self.setup.windows),
                                prompt=min(bucket_prompt(self.setup.prompt), max_len), max_len=max_len, steps=8)
            stacked[f"slots{slots}"] = {"total": programs.compile_s, "by_kind": dict(programs.compile_s_by_kind)}
        return {"cold_compile_s": cold or None, "warm_compile_s": warm, "stacked_cold_compile_s": stacked,
                "cache_dir": jax.config.jax_compilation_cache_dir}

    def encode(self) -> dict:
        setup = self.setup
        engine = self._engine(max(setup.slots))
        runs, _ = timed_runs(engine, requests(self.config, 8, setup, 1), setup.repeats)
        encode_s = statistics.median(r["encode_s"] for r in runs[1:])
        return {"requests": 8, "windows_per_request": setup.windows, "encode_s": encode_s,
                "windows_per_s": 8 * setup.windows / encode_s}

    def slots32(self) -> dict:
        return self.decode_at(self.setup.many_slots)

    def train(self) -> dict:
                
        setup, config = self.setup, self.config
        self._model = None  # the serving model's memory goes back before the training model is made
        jax.clear_caches()
        model = random_model(config, jnp.bfloat16, scan_layers=True, param_dtype=jnp.float32)
        optim = OptimSection(trainable=setup.trainable, learning_rate=1e-5)
        graphdef, params, frozen = split_model(model, setup.trainable)
        del model
        tx = optimizer(optim, 100)
        step = jax.jit(make_train_step(graphdef, tx, optim, remat=True), donate_argnums=(0,))
        state = TrainState(params, tx.init(params), jnp.int32(0))
        b, n = setup.train_batch, setup.train_tokens
        batch = make_batch(config, b, setup.train_windows, n)
        start = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready(metrics)
        first = time.perf_counter() - start
        times = []
        for _ in range(setup.repeats):
            start = time.perf_counter()
            state, metrics = step(state, frozen, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        step_s = statistics.median(times)
        sizes = {"trainable_text": 0, "frozen_backward": 0, "not_counted": 0}
        for path, var in nnx.to_flat_state(nnx.merge_state(params, frozen)):
            name = ".".join(map(str, path))
            count = int(np.prod(var.shape))
            if name.startswith(("layers.xattn.", "embed_tokens.")):
                sizes["trainable_text"] += count
            elif name.startswith(("layers.decoder.", "norm.")):
                sizes["frozen_backward"] += count
            else:
                sizes["not_counted"] += count
        tokens_per_s = b * n / step_s
        flops = (6 * sizes["trainable_text"] + 4 * sizes["frozen_backward"]) * tokens_per_s
        return {"trainable": setup.trainable, "batch": b, "tokens": n, "windows": setup.train_windows, "remat": True,
                "step_s": step_s,
                "compile_and_first_step_s": first, "tokens_per_s": tokens_per_s, "parameters": sizes,
                "model_flops_per_s": flops, "mfu": flops / self.peak_flops if self.peak_flops else None,
                "loss": float(metrics.loss)}

    def int8(self) -> dict:
        """Phase 1 again with the same weights quantized (phase 1 runs first if it has not), and how many of the
        greedy tokens equal bfloat16's for the same requests."""
        from af2_jax.nn.quant import quantize_int8

        bf16 = self.results.get("decode") or self.decode()
        bf16_tokens = dict(self.tokens)
        quantize_int8(self.model)
        runs = []
        for before in bf16["runs"]:
            run = self.decode_at(before["slots"])
            pairs = [(a, b) for x, y in zip(self.tokens[before["slots"]], bf16_tokens[before["slots"]])
                     for a, b in zip(x, y)]
            run.update(speedup_over_bfloat16=run["decode_tokens_per_s"] / before["decode_tokens_per_s"],
                       greedy_tokens_equal_to_bfloat16=sum(a == b for a, b in pairs) / len(pairs))
            runs.append(run)
        self._model = None  # the phases after this one measure bfloat16 weights again
        return {"runs": runs}

    def plan(self) -> dict:
        setup = self.setup
        rows = max(setup.slots)
        decode = self.results.get("decode")
        if decode is None:
            self.decode_at(rows)
        model = "af2-3b"
        if self.dry_run:
            model = str(self.out / "dry_run_config.json")
            Path(model).write_text(self.config.to_json())
        predicted = plan_serving(PlanRequest(model=model, batch=rows, windows=setup.windows, prompt=setup.prompt,
                                             new=setup.new, temporaries=not self.dry_run))
        total = predicted["weights"] + predicted["caches"] + (predicted["temporaries"] or 0)
        measured = self.results.get("decode", {}).get("peak_bytes_in_use") or memory()["peak_bytes_in_use"]
        return {"slots": rows, "predicted_bytes": total, "predicted": {k: predicted[k] for k in
                                                                       ("weights", "caches", "temporaries")},
                "measured_peak_bytes": measured, "measured_over_predicted": measured / total if measured else None,
                "note": "measured: the device's peak during the decode phase (all of its engines), if it ran"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the phases' JSON files")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, from {', '.join(PHASES)}")
    p.add_argument("--dry-run", action="store_true", help="a tiny model (the demo model's sizes), for a CPU")
    args = p.parse_args(argv)
    phases = [name.strip() for name in args.phases.split(",") if name.strip()]
    unknown = [name for name in phases if name not in PHASES]
    if unknown:
        p.error(f"unknown phase {unknown[0]!r}; phases: {', '.join(PHASES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="xla_cold_", dir=args.out)  # an empty persistent cache: phase 1 compiles cold

    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    check = Check(args.out, args.dry_run)
    print(f"device: {check.device}; bandwidth {check.bandwidth} B/s, peak bf16 {check.peak_flops} FLOP/s; phases "
          f"{', '.join(phases)}", flush=True)
    for phase in phases:
        start = time.perf_counter()
        result = getattr(check, phase)()
        check.write(phase, {**result, "phase_s": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

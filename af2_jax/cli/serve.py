"""`python -m af2_jax.serve`: an OpenAI-compatible HTTP server for Audio Flamingo 2.

    python -m af2_jax.serve                                   # the cached release, else the demo model
    python -m af2_jax.serve --checkpoint ckpt/af2 --port 8000 --slots 16

Routes: POST /v1/chat/completions (OpenAI's chat API with audio parts: input_audio {"data": base64, "format":
wav|flac|mp3|ogg}, or audio_url with a data: URL, or a file:/// URL inside --allowed-local-dir; "stream": true for
server-sent events), GET /v1/models, GET /health (503 until warmed up), GET /metrics (Prometheus).

Deviations from OpenAI: an absent temperature means greedy (as infer and AF2's benchmarks), absent max_tokens
means 256, top_k and ignore_eos are accepted, system messages are ignored (named in the response's "warnings"),
n > 1, logprobs, tools and response_format are refused with 400.

Requests decode with continuous batching on --slots slots; up to --max-queue more wait, beyond that 429. SIGTERM
stops accepting connections, lets the requests in flight finish within --shutdown-grace seconds, and exits 0.
The model runs on this host's devices only: one server per host, behind a load balancer, for more.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket

from af2_jax.cli.common import (EXIT_CODES, QUANTIZE_HELP, load_model, prog, run_command, setup_logging,
                               warn_if_cpu_only)
from af2_jax.config import MAX_WINDOWS_LIMIT, check_max_windows

log = logging.getLogger("af2_jax.serve")

API_KEY_ENV = "AF2_API_KEY"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("serve"), description=__doc__, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model")
    model.add_argument("--checkpoint", metavar="DIR",
                       help="af2-jax checkpoint folder; default: the converted release in the cache, else the demo "
                            "model (announced)")
    model.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    model.add_argument("--quantize", choices=["int8"], help=QUANTIZE_HELP)
    model.add_argument("--mesh", metavar="SPEC",
                       help="shard over this host's devices, e.g. 'tensor=4' (axes data, fsdp, tensor); default: "
                            "one device")
    model.add_argument("--served-model-name", metavar="NAME",
                       help="the name /v1/models lists and responses carry; default: the checkpoint folder's name")
    engine = p.add_argument_group("engine")
    engine.add_argument("--slots", type=int, default=8, help="requests decoding at once")
    engine.add_argument("--max-len", type=int, default=768,
                        help="each slot's text cache: prompt + max_tokens (default 768)")
    engine.add_argument("--max-windows", type=int,
                        help=f"windows per clip (1..{MAX_WINDOWS_LIMIT}; longer clips are cut, with a warning in "
                             "the response); default: the model's")
    engine.add_argument("--warmup", choices=["none", "min", "all"], default="min",
                        help="compile before serving: min (default) one window and prompts up to 64 tokens; all "
                             "every window and prompt bucket; none (first requests compile)")
    engine.add_argument("--background-compile", action=argparse.BooleanOptionalAction, default=None,
                        help="answer from the stacked layers (a few times quicker to compile) while the serving "
                             "layout (one buffer per layer, faster decoding) compiles in the background, then "
                             "switch to it (default: on, except with --quantize, --mesh or --warmup none, which "
                             "compile the serving layout before the first answer)")
    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 429")
    http.add_argument("--max-body-mb", type=float, default=100, help="largest request body; larger get 413")
    http.add_argument("--request-timeout", type=float, default=600,
                      help="seconds from arrival to the last token; later answers end with 504, their slot freed")
    http.add_argument("--shutdown-grace", type=float, default=30,
                      help="seconds in-flight requests get to finish after SIGTERM")
    http.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 routes (or set ${API_KEY_ENV})")
    http.add_argument("--allowed-local-dir", metavar="DIR",
                      help="folder whose files file:/// audio URLs may name (default: none may)")
    http.add_argument("--strict-model-name", action="store_true",
                      help="answer a request for another model name with 404 model_not_found")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _check_args(p: argparse.ArgumentParser, args) -> None:
    for name, value, low in (("--slots", args.slots, 1), ("--max-len", args.max_len, 2),
                             ("--max-queue", args.max_queue, 1), ("--port", args.port, 0)):
        if value < low:
            p.error(f"{name} must be >= {low}, got {value}")
    if args.port > 65535:
        p.error(f"--port must be at most 65535, got {args.port}")
    for name, value in (("--max-body-mb", args.max_body_mb), ("--request-timeout", args.request_timeout)):
        if not value > 0:
            p.error(f"{name} must be > 0, got {value}")
    if not args.shutdown_grace >= 0:
        p.error(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
    if args.max_windows is not None:
        try:
            check_max_windows(args.max_windows, "--max-windows ")
        except ValueError as err:
            p.error(str(err))
    if args.allowed_local_dir is not None and not os.path.isdir(args.allowed_local_dir):
        p.error(f"--allowed-local-dir {args.allowed_local_dir} is not a folder")
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    blockers = [flag for flag, on in (("--quantize", args.quantize), ("--mesh", args.mesh),
                                      ("--warmup none", args.warmup == "none")) if on]
    if args.background_compile and blockers:
        p.error(f"--background-compile does not combine with {', '.join(blockers)} (int8 weights and meshes keep "
                "the serving layout from the start; --warmup none compiles nothing in advance)")
    args.background_compile = args.background_compile is not False and not blockers


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    setup_logging("%(asctime)s %(message)s")
    return run_command(lambda: _serve(args), debug=args.debug)


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket (SO_REUSEADDR: a restart need not wait for the old one's TIME_WAIT)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _serve(args) -> int:
    try:
        import uvicorn

        from af2_jax.server import EngineRunner, ServerOptions, create_app
    except ImportError as err:
        raise ValueError(f"the server needs the serve extra ({err.name} is missing): pip install -e '.[serve]'") \
            from None
    from af2_jax.checkpoint.folder import read_config
    from af2_jax.checkpoint.resolve import resolve_checkpoint
    from af2_jax.distributed import multi_process_launch
    from af2_jax.engine import Engine
    from af2_jax.sharding import check_batch_splits, make_mesh
    from af2_jax.tokenizer import load_tokenizer

    if multi_process_launch():
        raise ValueError("this is one process of a multi-process launch (a TPU pod slice, SLURM or a JAX "
                         "coordinator): the server runs on one host's devices; start one server per host and put a "
                         "load balancer in front")
    warn_if_cpu_only()
    mesh = make_mesh(args.mesh) if args.mesh else None
    if mesh is not None:
        check_batch_splits(mesh, args.slots, "--slots", fix="pass a multiple of {data}")
    path, why = resolve_checkpoint(args.checkpoint, dtype=args.dtype)
    config, _ = read_config(path)
    positions = config.lm.max_position_embeddings
    if args.max_len > positions:
        raise ValueError(f"--max-len {args.max_len} is over the model's {positions} positions "
                         f"(lm.max_position_embeddings in {path / 'config.json'}); pass --max-len {positions} or less")
    tokenizer = load_tokenizer(path, config.tokens)
    sock = _listen(args.host, args.port)  # before the model loads, so a taken port fails at once
    model = load_model(path, why, dtype=args.dtype, mesh=mesh, quantize=args.quantize,
                       scan_layers=args.background_compile)

    def make_engine() -> Engine:
        return Engine(model, tokenizer, slots=args.slots, max_len=args.max_len, max_pending=args.max_queue,
                      mesh=mesh, max_windows=args.max_windows)

    name = args.served_model_name or path.resolve().name
    runner = EngineRunner(make_engine, warmup=args.warmup, background_compile=args.background_compile)
    app = create_app(runner, tokenizer,
                     ServerOptions(served_model_name=name, max_body_mb=args.max_body_mb,
                                   request_timeout=args.request_timeout, api_key=args.api_key,
                                   allowed_local_dir=args.allowed_local_dir,
                                   strict_model_name=args.strict_model_name))
    host, port = sock.getsockname()[:2]
    log.info("serving %s on http://%s:%d/v1 (%d slots, max_len %d, queue %d%s); /health is 503 until %s", name,
             host, port, args.slots, args.max_len, args.max_queue, ", API key required" if args.api_key else "",
             "the first warm-up answer (the serving layout then compiles in the background)"
             if args.background_compile else f"warm-up ({args.warmup}) ends")
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=args.shutdown_grace))
    # uvicorn re-raises SIGTERM once it has shut down gracefully; a handler makes that planned stop exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run(sockets=[sock])
    log.info("stopped")
    if runner.engine.compiling:
        # XLA cannot be interrupted, and a compilation still running on its thread aborts the interpreter's exit.
        logging.shutdown()
        os._exit(0)
    return 0

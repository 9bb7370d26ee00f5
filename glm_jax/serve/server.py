"""`glm-jax serve`'s start-up: the listening socket, the model and its engine, logging, signals and
uvicorn; and, in a multi-host run, `jax.distributed` and the processes that only follow process 0."""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Callable

import uvicorn

from glm_jax.options import MAX_BATCH, MAX_QUEUE, SERVE_MAX_MODEL_LEN, SERVE_STEPS_PER_CALL, SHUTDOWN_TIMEOUT
from glm_jax.runtime import count_compiles
from glm_jax.serve.app import create_app

log = logging.getLogger("glm_jax.serve")


def join_distributed(*, coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, mesh=None) -> int:
    """Joins a multi-process JAX run: at `coordinator` (HOST:PORT of process 0) with the other two,
    or, with no coordinator, as found from the environment (TPU pods, clusters); this process's index.
    The model's `mesh` must span the devices of every process."""
    import jax

    if coordinator and (num_processes is None or process_id is None):
        raise ValueError("--coordinator needs --num-processes and --process-id")
    if mesh is None:
        raise ValueError("several processes need a --mesh over all their devices")
    if jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    return jax.process_index()


def serve_length(model, max_model_len: int | None) -> int:
    """Tokens per request: `max_model_len`, by default the model's context, at most SERVE_MAX_MODEL_LEN."""
    context = model.config.max_seq_len
    max_model_len = max_model_len or min(context, SERVE_MAX_MODEL_LEN)
    if max_model_len > context:
        raise ValueError(f"--max-model-len {max_model_len} exceeds the model's context length {context}")
    return max_model_len


def _log_to_stderr() -> None:
    """The server's log (start-up, requests, shutdown) as timestamped lines on stderr."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s glm-jax serve: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _start_engine(load: Callable, *, max_batch: int, max_model_len: int | None, steps_per_call: int,
                  max_queue: int | None = None, speculation: dict | None = None):
    """Loads the model (`load()`) and compiles its engine's programs, saying so on the log; (model,
    engine, max_model_len). speculation: `Model.engine`'s speculative keywords (the requests' default)."""
    log.info("loading the model")
    start = time.perf_counter()
    model = load()
    import jax

    size = sum(x.nbytes for x in jax.tree.leaves(model.state))
    params = model.config.num_params
    log.info(f"loaded {model.path} in {time.perf_counter() - start:.1f} s: "
             + (f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M") + " parameters, "
             + (f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB") + f" ({model.dtype})")
    max_model_len = serve_length(model, max_model_len)
    engine = model.engine(max_batch=max_batch, max_model_len=max_model_len, steps_per_call=steps_per_call,
                          max_queue=max_queue, **(speculation or {}))
    log.info(f"compiling the engine's programs (max_batch {max_batch}, max_model_len {max_model_len})")
    with count_compiles() as compiled:
        engine.warm_up()
    log.info(f"compiled {compiled.format()}")
    return model, engine, max_model_len


def follow(load: Callable, *, max_batch: int = MAX_BATCH, max_model_len: int | None = None,
           steps_per_call: int = SERVE_STEPS_PER_CALL, speculation: dict | None = None) -> int:
    """A process other than 0 of a multi-host server: runs the engine rounds process 0 plans until
    it stops; serves nothing. `load()` returns the model."""
    _log_to_stderr()
    signal.signal(signal.SIGTERM, lambda signum, frame: None)   # process 0 decides when to stop
    _, engine, _ = _start_engine(load, max_batch=max_batch, max_model_len=max_model_len,
                                 steps_per_call=steps_per_call, speculation=speculation)
    engine.follow()
    log.info("stopped")
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server that says, on SIGTERM or Ctrl-C, how many requests it lets finish."""

    def __init__(self, config: uvicorn.Config, engine, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            stats = self.engine.stats()
            log.info(f"{signal.Signals(sig).name}: stopping; letting the requests in flight finish "
                     f"({stats['running']} running, {stats['waiting']} waiting; up to {self.shutdown_timeout:g} s)")
        super().handle_exit(sig, frame)


def serve(load: Callable, *, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          max_batch: int = MAX_BATCH, max_model_len: int | None = None, max_queue: int = MAX_QUEUE,
          steps_per_call: int = SERVE_STEPS_PER_CALL, shutdown_timeout: float = SHUTDOWN_TIMEOUT,
          speculation: dict | None = None) -> int:
    """Serves the model `load()` returns on host:port until SIGTERM or Ctrl-C, then lets the requests
    in flight finish (up to `shutdown_timeout` seconds). The port is taken before the model loads,
    so a taken port fails at once; every program is compiled before the first request."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0-65535, got {port}")
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    _log_to_stderr()
    model, engine, max_model_len = _start_engine(load, max_batch=max_batch, max_model_len=max_model_len,
                                                 steps_per_call=steps_per_call, max_queue=max_queue,
                                                 speculation=speculation)
    name = served_model_name or model.path.resolve().name
    app = create_app(model, engine, served_model_name=name, max_model_len=max_model_len)
    server = _Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=shutdown_timeout), engine, shutdown_timeout)
    # uvicorn handles SIGTERM (stops accepting, waits for the requests in flight), then raises it
    # again once it has shut down; this handler takes that second delivery, so the engine drains
    # and the command exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    bound_host, bound_port = sock.getsockname()[:2]
    engine.start()
    log.info(f"listening on http://{bound_host}:{bound_port} as {name} (max_batch {max_batch}, "
             f"max_model_len {max_model_len})")
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown(timeout=shutdown_timeout)
        log.info("stopped")
    return 0

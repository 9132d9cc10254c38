"""`furiosa-llm`: the command. `serve` spawns the engine core and the frontend and supervises them.

The launcher parses every flag once into a `frontend.config.FrontendConfig` (which holds the
engine's `ipc.config.EngineConfig`; flags take their defaults from those two) and hands each
child its part as JSON: the engine gets only `config.engine`. Children run in their own
session (a terminal's Ctrl-C reaches only the launcher, which then drains in order) and get
SIGTERM if the launcher itself dies.

- Start-up: the "serving on" line is printed once the frontend reports `READY=1` (it listens
  and the engine is ready) on the launcher's notify socket, which relays systemd's protocol.
  A child that cannot start reports one line there; the launcher prints it, stops the other
  child and exits non-zero, with no traceback (`--log-level debug` logs them). The
  data-parallel line (how many engine cores and why, `frontend.data_parallel`) comes just
  before the "serving on" line, so a failure stays one line.
- A child that dies stops the other; the command exits non-zero (a supervisor restarts it).
- SIGTERM/SIGINT: the frontend stops accepting and finishes in-flight requests (up to its
  graceful timeout), then the engine stops; exit 0. The socket directory is removed.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version

import msgspec

from frontend.config import FrontendConfig
from frontend.data_parallel import AUTO, DataParallelPlan, parse_size
from frontend.data_parallel import plan as plan_data_parallel
from frontend.default_model import ArtifactNotFoundError, default_model_path
from frontend.reasoning_parsers.registry import ReasoningParserRegistry
from ipc.config import POOLER_TYPES, RUNNERS, EngineConfig
from ipc.notify import STARTUP_ERROR_KEY, parse_state, sd_notify
from ipc.sockets import ipc_addresses, make_ipc_dir

SUPPORTED_DEVICES = ("cpu",)
REASONING_PARSERS = ReasoningParserRegistry.names()
FRONTEND_STOP_MARGIN_S = 10.0  # past --shutdown-timeout, for the frontend to close and exit
ENGINE_STOP_TIMEOUT_S = 10.0
AFTER_ENGINE_DEATH_TIMEOUT_S = 3.0  # lets the frontend send error events to open streams
API_KEY_ENV = "FURIOSA_LLM_API_KEY"


def package_version() -> str:
    try:
        return version("furiosa-llm")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def _defaults(*structs: type[msgspec.Struct]) -> dict:
    """Each field's default, so that a flag's default is the config's own."""
    fields = [f for struct in structs for f in msgspec.structs.fields(struct) if not f.required]
    return {f.name: f.default_factory() if f.default is msgspec.NODEFAULT else f.default for f in fields}


DEFAULTS = _defaults(EngineConfig, FrontendConfig)


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    parser = argparse.ArgumentParser(prog="furiosa-llm", description="OpenAI-compatible LLM server")
    parser.add_argument("--version", action="version", version=f"furiosa-llm {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve one model over the OpenAI API",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("model", nargs="?", default=None, metavar="ARTIFACT_PATH",
                       help="a GGUF file or a Hugging Face model directory "
                            "(default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default=d["host"], help="address to bind")
    serve.add_argument("--port", type=int, default=d["port"])
    serve.add_argument("--served-model-name", default=None,
                       help="the model name in the API (default: the artifact's name)")
    serve.add_argument("--devices", default=d["devices"], help="where the model runs: cpu")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="context length (default: the model's own max_position_embeddings, "
                            "which it may not exceed without --allow-long-max-model-len)")
    serve.add_argument("--allow-long-max-model-len", action="store_true",
                       help="accept a --max-model-len above the model's max_position_embeddings "
                            "(positions it was never trained on: its output may degrade)")
    serve.add_argument("--max-num-seqs", type=int, default=d["max_num_seqs"], help="most sequences stepped together")
    serve.add_argument("--max-num-batched-tokens", type=int, default=d["max_num_batched_tokens"],
                       help="token budget of one engine step (prefill chunks + decodes)")
    serve.add_argument("--kv-cache-gib", type=float, default=d["kv_cache_gib"], help="KV cache size in GiB")
    serve.add_argument("--block-size", type=int, default=d["block_size"], help="tokens per KV cache block")
    serve.add_argument("--kv-cache-dtype", default=d["kv_cache_dtype"], choices=["auto", "float32", "bfloat16", "float16"],
                       help="element type of the KV cache (auto: float32); 16 bits hold twice the "
                            "tokens in --kv-cache-gib and halve what decode attention reads")
    serve.add_argument("--activation-dtype", default=d["activation_dtype"], choices=["float32", "int8"],
                       help="what the matmuls of few rows over 4-bit weights (Q4_0, Q4_1, Q4_K) multiply "
                            "by: int8 quantizes activations per 32 values as llama.cpp does, faster "
                            "decode, outputs differ slightly from float32")
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=d["enable_prefix_caching"],
                       help="reuse the KV blocks of prompt prefixes seen before")
    serve.add_argument("--runner", default=d["runner"], choices=RUNNERS,
                       help="generate: completions, chat and responses; pooling: /v1/embeddings only (vLLM's flag)")
    serve.add_argument("--pooler-type", default=d["pooler_type"], choices=POOLER_TYPES,
                       help="with --runner pooling, an input's vector: the last token's final hidden state (as "
                            "decoder embedding models such as Qwen3-Embedding use) or the mean over its tokens; "
                            "L2-normalized")
    serve.add_argument("--num-threads", type=int, default=None,
                       help="BLAS threads in the engine core (default: 1, which stays fast while the frontend is busy)")
    serve.add_argument("--data-parallel-size", type=_data_parallel_size, default=AUTO, metavar="N|auto",
                       help="engine-core processes, each with --num-threads threads, its own KV cache of "
                            "--kv-cache-gib and (when the CPUs suffice) its own CPUs. 'auto': one per physical "
                            "core this process may use (CPU affinity, cgroup CPU quota) divided by --num-threads, "
                            "as many as fit in memory (MemAvailable, cgroup memory limit); engines on cores of "
                            "their own keep their speed when another process takes a core, where the BLAS "
                            "threads of one engine collapse. 1: a single engine. Requests go to the engine that "
                            "cached their prefix, else the least loaded")
    serve.add_argument("--chat-template", default=None, metavar="FILE",
                       help="a Jinja2 chat template file overriding the tokenizer's")
    serve.add_argument("--response-role", default=d["response_role"])
    serve.add_argument("--enable-auto-tool-choice", action="store_true")
    serve.add_argument("--tool-call-parser", default=None)
    serve.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                       help="split a reasoning model's <think> block into message.reasoning_content")
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help="require this bearer key (also FURIOSA_LLM_API_KEY)")
    serve.add_argument("--metrics-require-key", action="store_true",
                       help="with --api-key, /metrics needs the key too (by default it is open)")
    serve.add_argument("--allowed-origins", nargs="*", default=d["allowed_origins"], help="CORS origins; off by default")
    serve.add_argument("--max-waiting-requests", type=int, default=d["max_waiting_requests"],
                       help="requests queued beyond this get 503")
    serve.add_argument("--generation-config", default=d["generation_config"],
                       help="sampling defaults for fields a request leaves out: 'auto' (the model's "
                            "generation_config.json or GGUF general.sampling.*), 'vllm' (neutral) or a directory")
    serve.add_argument("--max-logprobs", type=int, default=d["max_logprobs"],
                       help="the most logprobs, top_logprobs or prompt_logprobs a request may ask for")
    serve.add_argument("--clamp-max-tokens", action="store_true",
                       help="clamp max_tokens to the remaining context instead of a 400")
    serve.add_argument("--disable-log-stats", action="store_true",
                       help="no periodic throughput / queue / KV cache line in the log")
    serve.add_argument("--log-level", default=d["log_level"],
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--shutdown-timeout", type=float, default=d["shutdown_timeout_s"], metavar="SECONDS",
                       help="after SIGTERM, in-flight requests get this long to finish; streams still "
                            "open then end with an error event and [DONE]")
    return parser


def config_from_args(args: argparse.Namespace) -> FrontendConfig:
    """Validate the flags and build the config; raises SystemExit with a message on bad input."""
    if args.devices.split(":")[0] not in SUPPORTED_DEVICES:
        raise SystemExit(
            f"furiosa-llm: device {args.devices!r} is not available: this build runs on "
            f"{', '.join(SUPPORTED_DEVICES)} only (try --devices cpu)"
        )
    if args.model is None:
        try:
            model = default_model_path()
        except ArtifactNotFoundError as e:
            raise SystemExit(f"furiosa-llm: {e}")
    else:
        model = os.path.abspath(args.model)
        if not os.path.exists(model):
            raise SystemExit(f"furiosa-llm: model artifact {args.model!r} does not exist")
    if args.chat_template and not os.path.isfile(args.chat_template):
        raise SystemExit(f"furiosa-llm: chat template file {args.chat_template!r} does not exist")
    if args.tool_call_parser is not None or args.enable_auto_tool_choice:
        if args.enable_auto_tool_choice and args.tool_call_parser is None:
            raise SystemExit("furiosa-llm: --enable-auto-tool-choice needs --tool-call-parser")
        try:
            from frontend.tool_parsers import ToolParserRegistry
            known = ToolParserRegistry.names()
        except ImportError:
            known = []
        if args.tool_call_parser not in known:
            raise SystemExit(f"furiosa-llm: unknown --tool-call-parser {args.tool_call_parser!r}; "
                             f"known: {', '.join(sorted(known))}")
    _check_limits(args)
    served_name = args.served_model_name or _default_served_name(model)
    engine = EngineConfig(
        model=model,
        served_model_name=served_name,
        devices=args.devices,
        max_model_len=args.max_model_len,
        allow_long_max_model_len=args.allow_long_max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_gib=args.kv_cache_gib,
        kv_cache_dtype=args.kv_cache_dtype,
        activation_dtype=args.activation_dtype,
        enable_prefix_caching=args.enable_prefix_caching,
        num_threads=args.num_threads,
        log_level=args.log_level,
        runner=args.runner,
        pooler_type=args.pooler_type,
        data_parallel_size=data_parallel_plan(args, model).size,
    )
    return FrontendConfig(
        engine=engine,
        host=args.host,
        port=args.port,
        chat_template=os.path.abspath(args.chat_template) if args.chat_template else None,
        response_role=args.response_role,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        api_key=args.api_key or None,
        metrics_require_key=args.metrics_require_key,
        allowed_origins=list(args.allowed_origins),
        max_waiting_requests=args.max_waiting_requests,
        clamp_max_tokens=args.clamp_max_tokens,
        max_logprobs=args.max_logprobs,
        generation_config=args.generation_config,
        disable_log_stats=args.disable_log_stats,
        shutdown_timeout_s=args.shutdown_timeout,
    )


def _check_limits(args: argparse.Namespace) -> None:
    """Numeric flags out of range are a start-up error naming the flag, never a silent default."""
    def refuse(flag: str, rule: str, value) -> None:
        raise SystemExit(f"furiosa-llm: --{flag} must be {rule}, got {value}")

    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
        if getattr(args, name) < 1:
            refuse(name.replace("_", "-"), "positive", getattr(args, name))
    for name in ("max_model_len", "num_threads"):  # None means "the default"; 0 is not a synonym
        if getattr(args, name) is not None and getattr(args, name) < 1:
            refuse(name.replace("_", "-"), "positive", getattr(args, name))
    if not 1 <= args.port <= 65535:
        refuse("port", "between 1 and 65535", args.port)
    if not (args.kv_cache_gib > 0 and math.isfinite(args.kv_cache_gib)):
        refuse("kv-cache-gib", "a positive number of GiB", args.kv_cache_gib)
    if args.max_logprobs < 0:
        refuse("max-logprobs", "0 or more", args.max_logprobs)
    if args.max_waiting_requests < 0:
        refuse("max-waiting-requests", "0 or more", args.max_waiting_requests)
    if not (args.shutdown_timeout >= 0 and math.isfinite(args.shutdown_timeout)):
        refuse("shutdown-timeout", "0 or more seconds", args.shutdown_timeout)
    if args.generation_config not in ("auto", "vllm") and not os.path.isdir(args.generation_config):
        refuse("generation-config", "auto, vllm or a directory", args.generation_config)


def _data_parallel_size(text: str) -> int | str:
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {text!r}") from None


def data_parallel_plan(args: argparse.Namespace, model: str) -> DataParallelPlan:
    return plan_data_parallel(args.data_parallel_size, args.num_threads or 1, model, args.kv_cache_gib)


def _default_served_name(model: str) -> str:
    name = os.path.basename(os.path.normpath(model))
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launcher dies (Linux prctl)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _child_setup(cpu_ids: list[int]):
    """The child's set-up before exec; pinning there means every thread the engine later
    starts (OpenBLAS, numba, its IO threads) inherits the CPU set."""
    def setup() -> None:
        _die_with_parent()
        if cpu_ids:
            os.sched_setaffinity(0, cpu_ids)
    return setup


class _Shutdown(Exception):
    pass


def _raise_shutdown(signum, frame):
    raise _Shutdown(signum)


class NotifyRelay:
    """The children's `$NOTIFY_SOCKET` (a datagram socket of the launcher's own): a start-up
    error is kept for the launcher to print; `READY=1` marks the server ready; every systemd
    state is forwarded to systemd's socket when the launcher runs under systemd."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.is_ready = False
        self.startup_error: str | None = None  # the first child's one-line cause

    def receive(self) -> None:
        """Handle every datagram waiting, without blocking."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            state = parse_state(data)
            error = state.pop(STARTUP_ERROR_KEY, None)
            if error is not None:
                self.startup_error = self.startup_error or error
                sd_notify(f"STATUS={error}")
                continue
            if state.get("READY") == "1":
                self.is_ready = True
            sd_notify(data.decode(errors="replace"))

    def close(self) -> None:
        self.sock.close()


class Launcher:
    def __init__(self, config: FrontendConfig, plan: DataParallelPlan | None = None):
        self.config = config
        engine = config.engine
        self.plan = plan or plan_data_parallel(engine.data_parallel_size, engine.num_threads or 1,
                                               engine.model, engine.kv_cache_gib)
        self.ipc_dir = make_ipc_dir()
        self.relay = NotifyRelay(os.path.join(self.ipc_dir, "notify.sock"))
        self.is_announced = False  # the "serving on" line is printed once, when ready
        self.engines: list[subprocess.Popen] = []  # in rank order
        self.frontend: subprocess.Popen | None = None

    def _spawn(self, module: str, config_json: str, *, api_key: str | None = None,
               cpu_ids: list[int] | None = None) -> subprocess.Popen:
        """The API key goes in the environment: a command line is readable by every local user."""
        env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
        env["NOTIFY_SOCKET"] = self.relay.path
        if module == "frontend":
            # transformers' "PyTorch was not found" advice: the frontend needs only tokenizers
            env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        if api_key:
            env[API_KEY_ENV] = api_key
        return subprocess.Popen(
            [sys.executable, "-m", module, "--config-json", config_json],
            start_new_session=True,
            preexec_fn=_child_setup(cpu_ids or []),
            env=env,
        )

    def run(self) -> int:
        signal.signal(signal.SIGTERM, _raise_shutdown)
        signal.signal(signal.SIGINT, _raise_shutdown)
        try:
            config = self.config
            self._spawn_engines()
            frontend_json = msgspec.structs.replace(config, api_key=None).to_json()
            self.frontend = self._spawn("frontend", frontend_json, api_key=config.api_key)
            return self._supervise()
        except _Shutdown:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            return self._stop_children(engine_died=False)
        finally:
            self._kill_leftovers()
            self.relay.close()
            shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def _spawn_engines(self) -> None:
        """One engine core per rank, each with its own sockets and CPU set; the frontend's
        config gets every engine's addresses and pid (rank 0's as `engine` / `engine_pid`)."""
        config = self.config
        config.engine.data_parallel_size = self.plan.size
        for rank, cpu_ids in enumerate(self.plan.cpu_sets):
            input_address, output_address = ipc_addresses(self.ipc_dir, rank)
            engine = msgspec.structs.replace(config.engine, data_parallel_rank=rank, cpu_ids=cpu_ids,
                                             input_address=input_address, output_address=output_address)
            self.engines.append(self._spawn("engine_core", engine.to_json(), cpu_ids=cpu_ids))
            config.engine_addresses.append((input_address, output_address))
            config.engine_pids.append(self.engines[-1].pid)
        config.engine.input_address, config.engine.output_address = config.engine_addresses[0]
        config.engine_pid = self.engines[0].pid

    def _supervise(self) -> int:
        """Until a child exits or reports that it cannot start."""
        died = self._wait_for_exit([*self.engines, self.frontend], timeout_s=None)
        if not self.is_announced:
            # a start-up failure: nothing is served yet, so nothing drains; one line says why
            print(self.relay.startup_error or _startup_exit_line(died, self._name(died)),
                  file=sys.stderr, flush=True)
            self._kill_leftovers()
            return 1
        name = self._name(died)
        print(f"furiosa-llm: the {name} process exited unexpectedly; stopping", file=sys.stderr)
        self._stop_children(engine_died=(died is not self.frontend))
        return 1

    def _name(self, child: subprocess.Popen | None) -> str:
        if child is None or child is self.frontend:
            return "frontend"
        rank = self.engines.index(child)
        return "engine core" if len(self.engines) == 1 else f"engine core {rank} (pid {child.pid})"

    def _wait_for_exit(self, children: list[subprocess.Popen], timeout_s: float | None) -> subprocess.Popen | None:
        """The first of `children` to exit (not reaped; None on timeout), relaying their
        notifications meanwhile. A start-up error ends the wait too (the child is about to exit)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pidfds = {os.pidfd_open(child.pid): child for child in children}
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.relay.sock, selectors.EVENT_READ)
                for fd in pidfds:
                    selector.register(fd, selectors.EVENT_READ)
                while True:
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    events = selector.select(remaining)
                    self._receive_notifications()
                    exited = [pidfds[key.fd] for key, _ in events if key.fd in pidfds]
                    if exited:
                        return exited[0]
                    if self.relay.startup_error is not None and not self.is_announced:
                        return None
                    if deadline is not None and time.monotonic() >= deadline:
                        return None
        finally:
            for fd in pidfds:
                os.close(fd)

    def _receive_notifications(self) -> None:
        self.relay.receive()
        if self.relay.is_ready and not self.is_announced:
            self.is_announced = True
            config = self.config
            # printed once ready, so that a start-up failure stays one line
            print(f"furiosa-llm: data parallel: {self.plan.reason}", file=sys.stderr, flush=True)
            print(f"furiosa-llm: serving {config.engine.model} as {config.served_model_name!r} "
                  f"on http://{config.host}:{config.port}", file=sys.stderr, flush=True)

    def _stop_children(self, *, engine_died: bool) -> int:
        """Frontend first (it drains in-flight requests), then the engines together. After an
        engine's death the survivors have nothing left to serve: all stop at once."""
        if engine_died:
            return self._terminate([self.frontend, *self.engines], AFTER_ENGINE_DEATH_TIMEOUT_S)
        status = self._terminate([self.frontend], self.config.shutdown_timeout_s + FRONTEND_STOP_MARGIN_S)
        return self._terminate(self.engines, ENGINE_STOP_TIMEOUT_S) or status

    def _terminate(self, children: list[subprocess.Popen | None], timeout_s: float) -> int:
        """SIGTERM each live child, wait up to `timeout_s` for all, kill the rest; 1 if any
        exited non-zero."""
        live = [child for child in children if child is not None and child.poll() is None]
        for child in live:
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        waiting = list(live)
        while waiting and time.monotonic() < deadline:
            if self._wait_for_exit(waiting, timeout_s=deadline - time.monotonic()) is None:
                break  # the time is up (or a start-up error: the child is about to exit)
            waiting = [child for child in waiting if child.poll() is None]
        for child in waiting:
            child.kill()
        return int(any(child.wait() != 0 for child in live))

    def _kill_leftovers(self) -> None:
        for child in (self.frontend, *self.engines):
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()


def _startup_exit_line(child: subprocess.Popen | None, name: str) -> str:
    """For a child that died at start-up without saying why (killed, out of memory, a crash)."""
    code = child.wait() if child is not None else None
    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
    return f"furiosa-llm: the {name} process {how} during start-up (--log-level debug shows more)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        config = config_from_args(args)
        return Launcher(config, data_parallel_plan(args, config.engine.model)).run()
    return 2


if __name__ == "__main__":
    sys.exit(main())

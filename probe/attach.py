"""`attach(model, ...)`: hook every router of a MoE model and record what it decides.

Legend: T tokens, E experts, K slots, B sequences, S positions.

Forward path (hooks): device-only statistics into per-site buffers, then at the end of
the top-level forward one non-blocking copy into host memory and a queue put. A
background thread waits on the copies, builds frames and hands them to the sink. The
hooks never raise into forward and never touch the model's outputs.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moescope.probe.adapters.base import Adapter, RouterSite
from moescope.probe.adapters.structural import register_helper_hooks
from moescope.probe.adapters.watch import select_sites
from moescope.probe.capture import AGG_ROWS, CallTensors, HostCopier, SiteState, accumulate
from moescope.probe.context import ForwardInputs, InputReader, StepContext, check_run_id, detect_rank, read_inputs
from moescope.probe.framer import ForwardRecord, Framer, SiteRecord, default_producer
from moescope.probe.placement import device_map_config
from moescope.probe.sinks import MemorySink, Sink, make_sink
from moescope.token_texts import check_tokenizer

log = logging.getLogger("moescope.probe")


@dataclass
class _Forward:
    inputs: ForwardInputs | None
    checkpoint: str
    step: int
    rank: int
    microbatch: int
    phase: str
    domains: list | None
    pos_offset: int
    per_token: bool
    probe_set: str | None = None
    probe_first: int = 0


@dataclass
class _Flush:
    done: threading.Event
    final: bool = False


class CudaGraphCaptureError(RuntimeError):
    """A probed forward ran inside CUDA graph capture, where hooks would never run on replay."""


CUDA_GRAPH_MESSAGE = ("moescope probe: forward hooks do not run when a CUDA graph replays, so nothing would be "
                      "recorded; capture the graph from the unprobed model (probe.detach() first) and record with "
                      "eager forwards, e.g. a probe-set replay")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Probe:
    """A live attachment. Use through `attach(...)`; see its docstring."""

    def __init__(self, model: nn.Module, *, sink: str | Sink | None = "local", run: str = "default",
                 checkpoint: str = "initial", step: int = 0, rank: int | None = None, sample_rate: float = 1.0,
                 spec: Any = None, max_host_bytes: int = 256 << 20, producer: str | None = None,
                 sites: list[tuple[Adapter, RouterSite]] | None = None, frame_interval_s: float = 1.0,
                 frame_rows: int = 1 << 20, seed: int = 0, watch: Any = None, expert_devices: Any = None,
                 ep_size: int | None = None, tokenizer: Any = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
        check_run_id(run)
        if not isinstance(checkpoint, str) or not checkpoint:
            raise ValueError(f"checkpoint must be a non-empty string, got {checkpoint!r}")
        if not 0.0 <= float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be between 0 and 1, got {sample_rate!r}")
        if int(max_host_bytes) <= 0:
            raise ValueError(f"max_host_bytes must be positive, got {max_host_bytes!r}")
        if _capturing():
            raise CudaGraphCaptureError(CUDA_GRAPH_MESSAGE)
        if tokenizer is not None:
            check_tokenizer(tokenizer)  # TypeError naming what a tokenizer needs
        if sites is None:
            from moescope.probe.adapters import discover

            sites = discover(model, spec)  # raises NoRouterFound with a one-line message
        if watch is not None:
            sites = select_sites(sites, watch)  # raises ValueError when the filter keeps nothing
        if not sites:
            raise ValueError("attach() got an empty list of router sites")
        devices = device_map_config(model, sites, expert_devices, ep_size)  # ValueError on a bad map
        self.model = model
        self._cuda = torch.cuda.is_available()
        self.rank = detect_rank() if rank is None else int(rank)
        self.producer = producer or default_producer(self.rank)
        self.sample_rate = float(sample_rate)
        self.max_host_bytes = int(max_host_bytes)
        self.frame_interval_s, self.frame_rows = float(frame_interval_s), int(frame_rows)
        self.ctx = StepContext(run=run, checkpoint=checkpoint, step=int(step), rank=self.rank)
        self._owns_sink = isinstance(sink, str) or sink is None
        self.sink = make_sink(sink)
        self._pairs = [(adapter, SiteState(i, site)) for i, (adapter, site) in enumerate(sites)]
        self._reader = InputReader(model)
        self._copier = HostCopier()
        self.framer = Framer(run, self.producer, [s.site for _, s in self._pairs], self.sample_rate, seed,
                             run_config={"probe": {"producer": self.producer, "sample_rate": self.sample_rate,
                                                   "adapters": sorted({getattr(a, "name", type(a).__name__) for a, _ in self._pairs})}, **devices},
                             tokenizer=tokenizer)
        self.framer.add_checkpoint(checkpoint, int(step))
        self._queue: queue.Queue = queue.Queue()  # unbounded in items; bytes are bounded by the budget
        self._budget_lock = threading.Lock()
        self._host_bytes = 0
        self._pending_bytes = 0
        self._fwd: _Forward | None = None
        self._depth = 0
        self._dropped_seqs: list[int] = []
        self._counts: Counter = Counter()
        self._failure_sites: Counter = Counter()
        self._logged: set[str] = set()
        self._site_ns = 0
        self._top_ns = 0
        self._peak_bytes = 0
        self._handles: list = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"moescope-probe-{run}", daemon=True)
        try:
            self._register()
        except BaseException:
            self._remove_handles()
            if self._owns_sink:
                self.sink.close()
            raise
        self._thread.start()

    # ------------------------------------------------------------ public API
    def set_step(self, step: int) -> None:
        with self.ctx.lock:
            self.ctx.step, self.ctx.microbatch = int(step), 0

    def next_step(self) -> int:
        with self.ctx.lock:
            self.ctx.step, self.ctx.microbatch = self.ctx.step + 1, 0
            return self.ctx.step

    def set_domains(self, domains: list | None) -> None:
        """Domain label per sequence of the next forward call (None entries stay unlabelled)."""
        if domains is not None and (isinstance(domains, str) or not hasattr(domains, "__len__")):
            raise TypeError(f"set_domains() takes one label per sequence (a list), got {type(domains).__name__}")
        with self.ctx.lock:
            self.ctx.domains = list(domains) if domains is not None else None

    def set_probe_set(self, name: str | None, first_sequence: int = 0) -> None:
        """The next forward call's sequences are sequences first_sequence, first_sequence + 1, ...
        of probe set `name`: its rows carry probe_set = name and seq = the index in the set."""
        if name is not None:
            from moescope.probe_sets import check_probe_set_name

            check_probe_set_name(name)
        if isinstance(first_sequence, bool) or not isinstance(first_sequence, int) or first_sequence < 0:
            raise ValueError(f"first_sequence must be an int >= 0, got {first_sequence!r}")
        with self.ctx.lock:
            self.ctx.probe_set, self.ctx.probe_first = name, first_sequence

    def set_checkpoint(self, name: str, step: int | None = None, path: str | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"checkpoint must be a non-empty string, got {name!r}")
        with self.ctx.lock:
            self.ctx.checkpoint = name
            if step is not None:
                self.ctx.step, self.ctx.microbatch = int(step), 0
        self._queue.put(("checkpoint", name, step, None if path is None else str(path)))

    @contextlib.contextmanager
    def generating(self):
        """Label the forwards inside as one generate(): the first is prefill, the rest decode."""
        with self.ctx.lock:
            self.ctx.generating, self.ctx.generate_calls, self.ctx.generate_offset = True, 0, 0
        try:
            yield self
        finally:
            with self.ctx.lock:
                self.ctx.generating = False

    def generate(self, model: nn.Module | None = None, *args, **kwargs):
        """`model.generate(*args, **kwargs)` with prefill and each decode step recorded."""
        model = self.model if model is None else model
        with self.generating():
            return model.generate(*args, **kwargs)

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Turn everything captured so far into frames and hand them to the sink."""
        if self._closed or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put(_Flush(done))
        ok = done.wait(timeout)
        self.sink.flush(timeout)
        return ok

    def tables(self):
        """Tables recorded so far (memory sink only): {"routing", "token_stats", "expert_step"}."""
        if not isinstance(self.sink, MemorySink):
            raise ValueError(f"probe.tables() needs sink='memory'; this probe writes to {type(self.sink).__name__}")
        self.flush()
        return self.sink.tables()

    def stats(self) -> dict:
        c = self._counts
        calls = c["router_calls"]
        return {
            "producer": self.producer, "frames": c["frames"], "rows": c["rows"], "token_rows": c["token_rows"],
            "forwards": c["forwards"], "router_calls": calls,
            "dropped_frames": c["dropped_frames"],
            "dropped_captures": c["dropped_captures"], "dropped_token_captures": c["dropped_token_captures"],
            "calls_outside_forward": c["calls_outside_forward"],
            "failures": sum(self._failure_sites.values()), "failure_sites": dict(self._failure_sites),
            "host_us_per_layer": (self._site_ns / calls / 1e3) if calls else 0.0,
            "host_us_per_forward": (self._top_ns / c["forwards"] / 1e3) if c["forwards"] else 0.0,
            "host_bytes": self._host_bytes + self._pending_bytes, "peak_host_bytes": self._peak_bytes,
            "max_host_bytes": self.max_host_bytes, "queue_depth": self._queue.qsize(), "sites": len(self._pairs),
        }

    def detach(self, timeout: float | None = 60.0) -> None:
        """Remove every hook, send what is pending plus the final frame, close the sink. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._remove_handles()
        finally:
            if self._thread.is_alive():
                done = threading.Event()
                self._queue.put(_Flush(done, final=True))
                done.wait(timeout)
                self._thread.join(timeout)
            try:
                self.sink.flush(timeout)
            finally:
                if self._owns_sink:
                    self.sink.close()

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------ hooks
    def _register(self) -> None:
        for adapter, state in self._pairs:
            path = state.site.hook_module_path or state.site.module_path
            try:
                module = self.model.get_submodule(path) if path else self.model
            except AttributeError:
                raise ValueError(f"router site {path!r} is not a submodule of {type(self.model).__name__}") from None
            # Helper hooks first: a structural adapter's post hook must finish before the site hook reads it.
            self._handles += register_helper_hooks(self.model, adapter, state.site)
            self._handles.append(module.register_forward_hook(self._site_hook(adapter, state), with_kwargs=True))
        self._handles.append(self.model.register_forward_pre_hook(torch.compiler.disable(self._pre_hook), with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(torch.compiler.disable(self._post_hook), with_kwargs=True,
                                                              always_call=True))

    def _remove_handles(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _fail(self, where: str, exc: BaseException) -> None:
        self._failure_sites[where] += 1
        if where not in self._logged:
            self._logged.add(where)
            log.warning("moescope probe: %s failed (%s: %s); further failures there are only counted",
                        where, type(exc).__name__, exc)

    def _site_hook(self, adapter: Adapter, state: SiteState):
        where = state.site.module_path

        @torch.compiler.disable
        def hook(module, args, kwargs, output):
            if self._cuda and torch.cuda.is_current_stream_capturing():
                raise CudaGraphCaptureError(CUDA_GRAPH_MESSAGE)  # the one error the probe raises into forward
            t0 = time.perf_counter_ns()
            try:
                fwd = self._fwd
                if fwd is None:
                    # Not inside a top-level forward (e.g. activation-checkpoint recompute in backward).
                    self._counts["calls_outside_forward"] += 1
                    return None
                cap = adapter.capture(state.site, module, args, kwargs, output)
                if cap is not None:
                    agg_6E = state.begin(cap.expert_ids_TK.device)
                    valid_T = fwd.inputs.valid_T if fwd.inputs is not None else None
                    call = accumulate(agg_6E, cap, valid_T, fwd.per_token)
                    if call is not None:
                        state.calls.append(call)
                    self._counts["router_calls"] += 1
            except Exception as exc:  # noqa: BLE001 - the probe never raises into forward
                self._fail(where, exc)
            finally:
                self._site_ns += time.perf_counter_ns() - t0
            return None

        return hook

    def _pre_hook(self, module, args, kwargs):
        t0 = time.perf_counter_ns()
        try:
            self._depth += 1
            if self._depth == 1:
                self._begin_forward(args, kwargs)
        except Exception as exc:  # noqa: BLE001
            self._fwd = None
            self._fail("forward-pre", exc)
        self._top_ns += time.perf_counter_ns() - t0
        return None

    def _post_hook(self, module, args, kwargs, output):
        t0 = time.perf_counter_ns()
        try:
            self._depth = max(0, self._depth - 1)
            if self._depth == 0:
                self._end_forward()
        except Exception as exc:  # noqa: BLE001
            self._fail("forward-post", exc)
        finally:
            if self._depth == 0:
                self._fwd = None
        self._top_ns += time.perf_counter_ns() - t0
        return None

    def _begin_forward(self, args: tuple, kwargs: dict) -> None:
        inputs = read_inputs(self._reader, args, kwargs)
        length = inputs.length if inputs is not None else 0
        with self.ctx.lock:
            ctx = self.ctx
            if ctx.generating:
                phase = "prefill" if ctx.generate_calls == 0 else "decode"
                pos_offset = ctx.generate_offset
                ctx.generate_calls += 1
                ctx.generate_offset += length
            else:
                pos_offset = 0
                phase = "train" if self.model.training else "eval"
                # A mask longer than the call's tokens means a KV cache: a decode step (shape, not data).
                if (not self.model.training and inputs is not None and inputs.mask_BM is not None
                        and inputs.mask_BM.shape[1] > inputs.length):
                    phase = "decode"
            domains, ctx.domains = ctx.domains, None
            probe_set, ctx.probe_set = ctx.probe_set, None
            microbatch = ctx.microbatch
            ctx.microbatch += 1
            fwd = _Forward(inputs, ctx.checkpoint, ctx.step, ctx.rank, microbatch, phase, domains, pos_offset,
                           per_token=self.sample_rate > 0 and self._host_bytes + self._pending_bytes < self.max_host_bytes,
                           probe_set=probe_set, probe_first=ctx.probe_first)
        for _, state in self._pairs:
            state.used_in_forward = False
            state.calls = []
        self._counts["forwards"] += 1
        self._fwd = fwd

    def _reserve(self, nbytes: int) -> bool:
        with self._budget_lock:
            if self._host_bytes + self._pending_bytes + nbytes > self.max_host_bytes:
                return False
            self._host_bytes += nbytes
            self._peak_bytes = max(self._peak_bytes, self._host_bytes + self._pending_bytes)
            return True

    def _end_forward(self) -> None:
        fwd = self._fwd
        used = [s for _, s in self._pairs if s.used_in_forward]
        if fwd is None or not used:
            return
        inputs = fwd.inputs
        input_tensors = [t for t in ((inputs.input_ids_BS, inputs.mask_BM, inputs.cache_position_S) if inputs else ())
                         if t is not None]
        agg_bytes = sum(AGG_ROWS * s.site.num_experts * 8 for s in used) + sum(t.numel() * 8 for t in input_tensors)
        token_bytes = sum(call.nbytes() for s in used for call in s.calls)
        per_token = fwd.per_token and token_bytes > 0
        if per_token and not self._reserve(agg_bytes + token_bytes):
            per_token = False
        if fwd.per_token and not per_token and self.sample_rate > 0:
            self._counts["dropped_token_captures"] += 1
        if not per_token and not self._reserve(agg_bytes):
            self._counts["dropped_captures"] += 1
            return
        rec = ForwardRecord(checkpoint=fwd.checkpoint, step=fwd.step, rank=fwd.rank, microbatch=fwd.microbatch,
                            phase=fwd.phase, domains=fwd.domains, batch=inputs.batch if inputs else 1,
                            length=inputs.length if inputs else 0, pos_offset=fwd.pos_offset,
                            input_ids_BS=None, mask_BM=None, cache_position_S=None,
                            reserved_bytes=agg_bytes + (token_bytes if per_token else 0),
                            probe_set=fwd.probe_set, probe_first=fwd.probe_first)
        if inputs is not None:
            hosts, event = self._copier.copy(input_tensors)
            rec.events.append(event)
            it = iter(hosts)
            rec.input_ids_BS = next(it) if inputs.input_ids_BS is not None else None
            rec.mask_BM = next(it) if inputs.mask_BM is not None else None
            rec.cache_position_S = next(it) if inputs.cache_position_S is not None else None
        for state in used:
            tensors = [state.agg_6E] + ([t for call in state.calls for t in call.tensors()] if per_token else [])
            hosts, event = self._copier.copy(tensors)
            state.copy_event = event
            rec.events.append(event)
            calls = None
            if per_token:
                it = iter(hosts[1:])
                calls = [CallTensors(next(it), next(it), next(it), next(it) if c.dropped_TK is not None else None)
                         for c in state.calls]
            rec.sites.append(SiteRecord(state.site, hosts[0], calls))
            state.calls = []
        self._queue.put_nowait(rec)

    # ------------------------------------------------------------ background thread
    def _run(self) -> None:
        deadline = None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            try:
                if isinstance(item, ForwardRecord):
                    self._process(item)
                    if deadline is None:
                        deadline = time.monotonic() + self.frame_interval_s
                    if self.framer.pending_rows >= self.frame_rows or self._pending_bytes >= self.max_host_bytes // 4:
                        self._emit()
                        deadline = None
                elif isinstance(item, tuple) and item[0] == "checkpoint":
                    self.framer.add_checkpoint(item[1], item[2], item[3])
                    if deadline is None:
                        deadline = time.monotonic() + self.frame_interval_s
                elif item is None:
                    self._emit()
                    deadline = None
                elif isinstance(item, _Flush):
                    if item.final:
                        self._emit(final=True)
                    elif deadline is not None:
                        self._emit()
                    deadline = None
            except Exception as exc:  # noqa: BLE001 - the thread must survive to send the final frame
                self._fail("background", exc)
            if isinstance(item, _Flush):
                item.done.set()
                if item.final:
                    return

    def _process(self, rec: ForwardRecord) -> None:
        try:
            for event in rec.events:
                if event is not None:
                    event.synchronize()
            before = self.framer.pending_bytes
            added = self.framer.add(rec)
            with self._budget_lock:
                self._pending_bytes += self.framer.pending_bytes - before
                self._peak_bytes = max(self._peak_bytes, self._host_bytes + self._pending_bytes)
            self._counts["pending_rows"] += added
        finally:
            with self._budget_lock:
                self._host_bytes -= rec.reserved_bytes

    def _emit(self, final: bool = False) -> None:
        dropped = list(self._dropped_seqs)
        extra = {"probe_stats": {k: v for k, v in self.stats().items() if isinstance(v, (int, float))}} if final else None
        frame = self.framer.emit(final=final, dropped_seqs=dropped, extra_meta=extra)
        try:
            self.sink.send(frame)
        except Exception as exc:  # noqa: BLE001 - a sink failure loses this frame, visibly
            self._dropped_seqs.append(frame.seq)
            self._counts["dropped_frames"] += 1
            for key in ("layers", "checkpoints"):
                for entry in frame.meta.get(key, []):
                    if key == "layers":
                        self.framer._layers_to_send.append(entry)
                    else:
                        self.framer._checkpoints.append(entry)
            self.framer.give_back_texts(frame)
            self._fail("sink", exc)
            return
        finally:
            with self._budget_lock:
                self._pending_bytes = 0
        self._dropped_seqs = [s for s in self._dropped_seqs if s not in dropped]
        self._counts["frames"] += 1
        self._counts["rows"] += frame.tables["routing"].num_rows
        self._counts["token_rows"] += frame.tables["token_stats"].num_rows


def attach(model: nn.Module, sink: str | Sink | None = "local", run: str = "default", checkpoint: str = "initial",
           step: int = 0, rank: int | None = None, sample_rate: float = 1.0, spec: Any = None,
           max_host_bytes: int = 256 << 20, producer: str | None = None, **options) -> Probe:
    """Hook every router of `model` and record its routing decisions.

    Use as a context manager (`with attach(model, sink="memory", run="r") as probe:`) so
    every hook is removed even on error, or call `probe.detach()` yourself.
    sink: "memory", "local", "local:/path/to/store", "redis://host:6379/0", "null", or a
    Sink. sample_rate samples per-token rows per sequence (expert_step stays exact).
    Extra options: sites=[(adapter, RouterSite), ...] to skip discovery; watch= to record only
    some of the routers found (layer numbers, module-path globs or a predicate over RouterSite,
    see moescope.probe.adapters.watch); frame_interval_s, frame_rows, seed; expert_devices= (the device
    of each expert: a list for every layer or {layer: list}, an entry a list of devices for replicas) or
    ep_size=N (contiguous), recorded with the run for per-device load (default: read from Megatron-Core's
    or DeepSpeed's expert-parallel group where the model has one; see moescope.device_map); tokenizer= (a
    Hugging Face tokenizer or any object with decode / convert_ids_to_tokens) records the text of each token
    id the first time it is seen, so pages show tokens as text (moescope.token_texts).
    """
    return Probe(model, sink=sink, run=run, checkpoint=checkpoint, step=step, rank=rank, sample_rate=sample_rate,
                 spec=spec, max_host_bytes=max_host_bytes, producer=producer, **options)

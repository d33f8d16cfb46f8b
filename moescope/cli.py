"""The `moescope` command line: one entry point, one sub-command per job.

User mistakes (bad paths, unknown runs, models without routers, bad options) end with
a one-line message and a non-zero exit; set MOESCOPE_DEBUG=1 to see tracebacks.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from moescope.settings import get_settings

EXIT_USAGE = 2


class CliError(Exception):
    """A user mistake found by the CLI itself."""


def _store(args, *, create: bool = True):
    from moescope import open_store

    settings = get_settings(store=args.store, database_url=args.database_url)
    return open_store(settings.store, settings.database_url, create=create)


def cmd_demo(args) -> int:
    from moescope.demo import run_demo

    if args.steps < 1:
        raise CliError(f"--steps must be at least 1, got {args.steps}")
    if args.backend == "triton":
        import torch

        if not torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
            # Must be set before any Triton kernel is defined; the interpreter is slow, so say so.
            os.environ["TRITON_INTERPRET"] = "1"
            print("no GPU: running the Triton kernels on the CPU interpreter (slow; try --steps 5)", file=sys.stderr)
    store = _store(args)
    summary = run_demo(store, steps=args.steps, run=args.run, seed=args.seed, checkpoints=args.checkpoints,
                       backend=args.backend, progress=not args.quiet)
    print(summary)
    if args.no_serve:
        return 0
    return _serve(store, args.host, args.port, evaluate_alerts=True)  # no beat in the demo: the server evaluates


def cmd_serve(args) -> int:
    return _serve(_store(args, create=False), args.host, args.port, evaluate_alerts=args.evaluate_alerts)


def _serve(store, host, port, *, evaluate_alerts: bool = False) -> int:
    from moescope.dashboard import serve

    settings = get_settings(host=host, port=port)
    _check_port_free(settings.host, settings.port)
    print(f"moescope dashboard on http://{settings.host}:{settings.port}/  (store {store.root}; Ctrl-C to stop)", flush=True)
    if evaluate_alerts:
        print(f"evaluating alert rules every {settings.alert_interval_s:g} s", flush=True)
    serve(store, settings.host, settings.port, settings=settings, evaluate_alerts=evaluate_alerts)
    return 0


def _check_port_free(host: str, port: int) -> None:
    """A bad or busy address is one line before anything is printed, not a server that never starts."""
    import socket

    if not 0 < port < 65536:
        raise CliError(f"--port must be in 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CliError(f"cannot serve on host {host!r}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            raise CliError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None


def cmd_resend(args) -> int:
    from moescope.probe.redis_sink import RedisSink

    if not os.path.isdir(args.directory):
        raise CliError(f"no spool directory at {args.directory!r}")
    if args.timeout < 0:
        raise CliError(f"--timeout must be >= 0, got {args.timeout}")
    settings = get_settings(broker_url=args.broker)
    # A producer's own folder (it holds *.frame files) or the spool root above it.
    root = os.path.dirname(os.path.abspath(args.directory)) if any(
        name.endswith(".frame") for name in os.listdir(args.directory)) else args.directory
    sink = RedisSink(settings.broker_url, stream=settings.stream, spool_dir=root, close_timeout_s=args.timeout)
    adopted = sink.stats["adopted"]
    sink.wait_acked(args.timeout)
    sink.close()
    left, rejected = len(sink.unacked), len(sink.rejected)
    print(f"{adopted} left-over frame(s) in {root}: {sink.stats['acked']} stored, {rejected} refused by the collector, "
          f"{left} still waiting (kept in the spool)")
    for producer, seq, reason in sink.rejected[:20]:
        print(f"  refused {producer}/{seq}: {reason}")
    return 0 if left == 0 and rejected == 0 else 1


def cmd_runs(args) -> int:
    import pandas as pd

    df = _store(args, create=False).runs()
    if df.empty:
        print("no runs recorded yet; try `moescope demo`")
        return 0
    df["created_at"] = pd.to_datetime(df["created_at"], unit="s").dt.strftime("%Y-%m-%d %H:%M:%S")
    df["last_write"] = pd.to_datetime(df["last_write"], unit="s").dt.strftime("%Y-%m-%d %H:%M:%S")
    print(df.to_string(index=False))
    return 0


def cmd_check(args) -> int:
    from moescope.collector.check import check_run

    text, code = check_run(_store(args, create=False), args.run)
    print(text)
    return code


def cmd_export(args) -> int:
    if not args.out and not args.tensorboard:
        raise CliError("export needs --out FILE.duckdb and/or --tensorboard DIR")
    store = _store(args, create=False)
    if args.out:
        print(f"wrote {store.export(args.run, args.out)}")
    if args.tensorboard:
        from moescope.probe.loggers import export_tensorboard

        steps = export_tensorboard(store, store.require_run(args.run), args.tensorboard)
        print(f"wrote TensorBoard event files of {steps} steps to {args.tensorboard}")
    return 0


def cmd_import(args) -> int:
    from moescope.collector import importers as imp

    store = _store(args)
    if args.format == "sglang-distribution":
        if args.top_k is None:
            raise CliError("--top-k is needed for an expert-distribution dump")
        steps = imp.import_expert_distribution(store, args.run, imp.read_sglang_distribution(args.file),
                                               top_k=args.top_k, checkpoint=args.checkpoint)
        print(f"imported {steps} forward passes into run {args.run} (aggregates only; weights unknown)")
        return 0
    if args.num_experts is None:
        raise CliError("--num-experts is needed: the capture holds expert ids, not the model's size")
    if args.format == "vllm-npz":
        captures, engine = imp.read_vllm_npz(args.file), "vllm"
    elif args.format == "sglang-per-token":
        captures, engine = imp.read_sglang_per_token(args.file), "sglang"
    else:
        if args.top_k is None:
            raise CliError("--top-k is needed to split SGLang's flat routed_experts")
        captures, engine = imp.read_sglang_jsonl(args.file, top_k=args.top_k, num_layers=args.num_layers), "sglang"
    rows = imp.import_captures(store, args.run, captures, num_experts=args.num_experts, engine=engine,
                               checkpoint=args.checkpoint)
    print(f"imported {len(captures)} requests, {rows:,} routing rows into run {args.run} (weights unknown)")
    return 0


def cmd_validate(args) -> int:
    from moescope.analysis.validate import validate_run

    result = validate_run(_store(args, create=False), args.run, examples=args.examples)
    print(result.text())
    return 0 if result.ok else 1


def cmd_report(args) -> int:
    from moescope.analysis.report import write_report

    report = write_report(_store(args, create=False), args.run, around=args.around, out=args.out)
    print(report.markdown)
    print(f"wrote {report.html_path}\nwrote {report.markdown_path}")
    return 0


def cmd_replay(args) -> int:
    from moescope.probe.replay import replay_checkpoint_files

    store = _store(args)
    if args.from_corpus:
        from moescope.probe_sets import ProbeSet

        store.register_probe_set(args.probe_set, ProbeSet.from_corpus())
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    for done in replay_checkpoint_files(store, args.run, args.probe_set, args.checkpoint, batch_size=args.batch_size):
        print(f"replayed probe set {args.probe_set} through {args.run}/{done['checkpoint']} (step {done['step']}): "
              f"{done['tokens']:,} tokens x {done['layers']} MoE layers")
    return 0


def cmd_scenario(args) -> int:
    from moescope.scenarios import run_scenario

    # Through a broker only when asked (flag or an explicitly set variable): workers must be ingesting.
    broker = args.broker or os.environ.get("MOESCOPE_BROKER_URL") or None
    report = run_scenario(args.name, _store(args), steps=args.steps, seed=args.seed, broker=broker, run=args.run,
                          progress=not args.quiet)
    print(report.render())
    return 0


def cmd_whatif(args) -> int:
    import pandas as pd

    from moescope.analysis.placement import LOAD_AWARE

    def ints(flag, text, sep=","):
        try:
            return [int(x) for x in text.split(sep)] if text else None
        except ValueError:
            raise CliError(f"{flag} must be integers separated by {sep!r}, got {text!r}") from None

    steps, fit_steps = (None if s is None else tuple(ints(f, s, ":") or ()) for f, s in (("--steps", args.steps),
                                                                                      ("--fit-steps", args.fit_steps)))
    scope = dict(layers=ints("--layers", args.layers), steps=steps, phase=args.phase, by="step" if args.per_step else "window")
    store = _store(args, create=False)
    if args.kind == "cache":
        df = store.metric("expert_cache", run=args.run, cache_sizes=ints("--cache-sizes", args.cache_sizes), **scope)
        print(df.to_string(index=False))
        return 0
    expert_map = None if args.expert_map is None else [ints("--expert-map", d, "+") for d in args.expert_map.split(",")]
    df = store.metric("placement", run=args.run, ep_size=args.ep_size, gpus_per_node=args.gpus_per_node,
                      redundant_slots=args.redundant_slots, policy=args.policy, expert_map=expert_map,
                      expert_groups=args.expert_groups, hidden_size=args.hidden_size, dtype=args.dtype,
                      fit_steps=fit_steps, **scope)
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(df.drop(columns=["placement"], errors="ignore").to_string(index=False))
    for layer, rows in df.groupby("layer") if "suggested" in df and df.policy.isin(LOAD_AWARE).any() else ():
        for row in rows[rows.suggested].itertuples():
            print(f"layer {row.layer}: suggested {row.policy} (balancedness {row.balancedness:.3f}, "
                  f"x{row.improvement:.2f} over {row.current}); devices -> experts: {row.placement}")
        if not rows.suggested.any():
            print(f"layer {layer}: no map suggested: none balances the fit window better than {rows.current.iloc[0]}")
    return 0


def cmd_worker(args) -> int:
    from moescope.collector.celery_app import run_worker

    settings = get_settings(store=args.store, database_url=args.database_url)
    threads = args.ingest_threads if args.ingest_threads is not None else settings.ingest_threads
    if threads < 1:
        raise CliError(f"--ingest-threads must be at least 1, got {threads}")
    return run_worker(settings, concurrency=args.concurrency, ingest_threads=threads) or 0


def cmd_beat(args) -> int:
    from moescope.collector.celery_app import run_beat

    return run_beat(get_settings(store=args.store, database_url=args.database_url)) or 0


def cmd_alerts(args) -> int:
    import pandas as pd

    from moescope.analysis import alerts

    # Only `add` may create a store: the others read, or write to rules that must already exist.
    store = _store(args, create=args.action == "add")
    if args.action in ("delete", "test"):
        # RULE is resolved as the API resolves /api/alerts/{rule}; --name is always a name.
        ref = args.rule if args.rule is not None else args.name
        if ref is None:
            raise CliError(f"alerts {args.action} needs a RULE (its id or name)")
        rule = alerts.get_rule(store, alerts.rule_key(ref) if args.rule is not None else ref)
        if rule is None:
            raise CliError(f"no alert rule {ref!r}")
    if args.action == "list":
        rules = alerts.list_rules(store)
        print(pd.DataFrame(rules).to_string(index=False) if rules else "no alert rules")
    elif args.action == "add":
        missing = [flag for flag, v in (("--name", args.name), ("--metric", args.metric), ("--threshold", args.threshold))
                   if v is None]
        if missing:
            raise CliError(f"alerts add needs {', '.join(missing)}")
        rule = alerts.add_rule(store, name=args.name, metric=args.metric, comparison=args.comparison,
                               threshold=args.threshold, run=args.run, layer=args.layer, expert=args.expert,
                               aggregation=args.aggregation, window_steps=args.window, ema_alpha=args.ema_alpha,
                               ema_span=args.ema_span, for_evaluations=args.for_evaluations, webhook=args.webhook)
        print(f"added rule {rule['id']} {rule['name']!r}: {_describe_rule(rule)}")
    elif args.action == "delete":
        alerts.delete_rule(store, rule["id"])
        print(f"deleted rule {rule['id']} {rule['name']!r}")
    elif args.action == "events":
        events = alerts.list_events(store, run=args.run)
        print(pd.DataFrame(events).to_string(index=False) if events else "no alert events")
    elif args.action == "evaluate":
        events = alerts.evaluate_alerts(store)
        print(f"{len(events)} new event(s)")
    elif args.action == "test":
        if args.run is None:
            raise CliError("alerts test needs --run RUN")
        series = alerts.rule_series(store, rule, args.run)
        print(f"rule {rule['id']} {rule['name']!r}: {_describe_rule(rule)}")
        if series.empty:
            print(f"run {args.run!r} has no data for this rule")
            return 0
        span = f"steps {series.step.iloc[0]}..{series.step.iloc[-1]} ({len(series)} evaluated)"
        transitions = alerts.replay(store, rule, args.run)
        if not transitions:
            print(f"over {span} of run {args.run!r} it would never have fired")
        else:
            print(f"over {span} of run {args.run!r}:")
            print(pd.DataFrame(transitions)[["step", "state", "value", "threshold"]].to_string(index=False))
    return 0


def _describe_rule(rule: dict) -> str:
    where = " ".join(f"{k} {rule[k]}" for k in ("run", "layer", "expert") if rule.get(k) is not None) or "every run"
    agg = {"step": "per step", "window": f"over a rolling window of {rule['window_steps']} steps",
           "ema": f"as an exponential moving average (alpha {rule.get('ema_alpha') or 0:.4g})"}[rule["aggregation"]]
    return (f"{rule['metric']} {agg} {rule['comparison']} {rule['threshold']:g} ({where}), "
            f"firing after {rule['for_evaluations']} consecutive step(s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moescope", description="Mixture-of-Experts observability and router analysis.")
    parser.add_argument("--version", action="version", version=f"moescope {__import__('moescope').__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=None, help="store directory, or object storage such as s3://bucket/prefix "
                        "(default $MOESCOPE_STORE or ./moescope-data)")
    common.add_argument("--database-url", default=None, help="SQLAlchemy URL of the metadata DB (default "
                        "$MOESCOPE_DATABASE_URL, else SQLite in the store directory; object storage needs one)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", parents=[common], help="train the reference MoE with the probe attached, record, then serve")
    demo.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    demo.add_argument("--run", default=None, help="run id (default demo-<timestamp>)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the model, corpus and batches")
    demo.add_argument("--checkpoints", type=int, default=4, help="checkpoints saved during training (default 4)")
    demo.add_argument("--backend", choices=["torch", "triton"], default="torch", help="MoE layer implementation")
    demo.add_argument("--no-serve", action="store_true", help="stop after recording")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--host", default=None, help="address to serve on afterwards (default settings.host, 127.0.0.1)")
    demo.add_argument("--port", type=int, default=None, help="port to serve on afterwards (default settings.port, 8050)")
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser("serve", parents=[common], help="serve the API and dashboard on 127.0.0.1")
    serve.add_argument("--host", default=None, help="address to bind (default settings.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port to bind (default settings.port, 8050)")
    serve.add_argument("--evaluate-alerts", action="store_true", help="evaluate the alert rules every alert_interval_s "
                       "in this process, for a deployment without `moescope beat` (safe beside one)")
    serve.set_defaults(func=cmd_serve)

    sub.add_parser("runs", parents=[common], help="table of recorded runs").set_defaults(func=cmd_runs)

    check = sub.add_parser("check", parents=[common], help="ledger reconciliation; non-zero exit on a gap")
    check.add_argument("run", help="run id")
    check.set_defaults(func=cmd_check)

    export = sub.add_parser("export", parents=[common], help="write a self-contained DuckDB database of one run")
    export.add_argument("run", help="run id")
    export.add_argument("--out", default=None, help="output .duckdb file (must not exist)")
    export.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="also (or instead) write routing summaries as TensorBoard event files into DIR")
    export.set_defaults(func=cmd_export)

    imp = sub.add_parser("import", parents=[common], help="store a serving engine's routing capture as routing rows of a run")
    imp.add_argument("run", help="run id (created, or appended to)")
    imp.add_argument("file", help="the capture file")
    imp.add_argument("--format", required=True,
                     choices=["vllm-npz", "sglang-jsonl", "sglang-distribution", "sglang-per-token"],
                     help="vLLM routed_experts arrays (np.savez), SGLang /generate responses (JSON lines), "
                          "or an SGLang expert-distribution dump (.pt) in 'stat' or 'per_token' mode")
    imp.add_argument("--num-experts", type=int, default=None, help="experts per MoE layer")
    imp.add_argument("--top-k", type=int, default=None, help="experts per token (SGLang formats)")
    imp.add_argument("--num-layers", type=int, default=None, help="MoE layers (SGLang responses without token counts)")
    imp.add_argument("--checkpoint", default="serving", help="checkpoint name for these rows (default: serving)")
    imp.set_defaults(func=cmd_import)

    validate = sub.add_parser("validate", parents=[common], help="check the recorded data's invariants; exit 1 on a violation")
    validate.add_argument("run", help="run id")
    validate.add_argument("--examples", type=int, default=3, help="example rows shown per failed check (default 3)")
    validate.set_defaults(func=cmd_validate)

    report = sub.add_parser("report", parents=[common], help="offline HTML incident report + Markdown summary of one run")
    report.add_argument("run", help="run id")
    report.add_argument("--around", type=int, default=None, help="step the charts centre on (default: the earliest onset)")
    report.add_argument("--out", default=None, help="HTML file to write (default ./moescope-report-RUN.html); .md beside it")
    report.set_defaults(func=cmd_report)

    replay = sub.add_parser("replay", parents=[common],
                            help="replay a registered probe set through checkpoints of the reference model")
    replay.add_argument("--run", required=True, help="run the replays are recorded in (a model version)")
    replay.add_argument("--probe-set", required=True, help="name of a probe set registered in the store")
    replay.add_argument("--checkpoint", required=True, action="append", metavar="PATH",
                        help="checkpoint file (repeat for several); written by the demo or save_reference_checkpoint")
    replay.add_argument("--from-corpus", action="store_true",
                        help="first register the probe set from the bundled corpus (held-out sequences)")
    replay.add_argument("--batch-size", type=int, default=16)
    replay.set_defaults(func=cmd_replay)

    from moescope.scenarios import SCENARIOS

    scenario = sub.add_parser("scenario", parents=[common], help="train the reference MoE into a validated scenario, "
                              "record it, print its figures and verdict")
    scenario.add_argument("name", choices=list(SCENARIOS), help="; ".join(f"{s.name}: {s.summary}" for s in SCENARIOS.values()))
    scenario.add_argument("--steps", type=int, default=None, help="training steps per run (default per scenario)")
    scenario.add_argument("--seed", type=int, default=0, help="seed of the models, corpus and batches")
    scenario.add_argument("--run", default=None, help="prefix of the run ids (default NAME-<timestamp>)")
    scenario.add_argument("--broker", default=None, help="record through this Redis URL into `moescope worker`s "
                          "(default $MOESCOPE_BROKER_URL if set, else straight into the store)")
    scenario.add_argument("--quiet", action="store_true", help="no progress bars")
    scenario.set_defaults(func=cmd_scenario)

    resend = sub.add_parser("resend", parents=[common], help="deliver the frames a dead producer left in its spool")
    resend.add_argument("directory", help="spool directory (as printed by the probe) or one producer's folder in it")
    resend.add_argument("--broker", default=None, help="Redis URL (default $MOESCOPE_BROKER_URL)")
    resend.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the store's acknowledgements")
    resend.set_defaults(func=cmd_resend)

    from moescope.analysis.placement import POLICIES

    whatif = sub.add_parser("whatif", parents=[common], help="expert placement / hot-set cache what-if on a recorded run")
    whatif.add_argument("kind", choices=["placement", "cache"], help="expert placement over devices, or a hot-expert cache")
    whatif.add_argument("run", help="run id whose recorded traffic is replayed")
    whatif.add_argument("--layers", help="layer ids, e.g. 0,3 (default all)")
    whatif.add_argument("--steps", help="LO:HI, inclusive: the window replayed (default all)")
    whatif.add_argument("--phase", help="only rows of this phase (train, eval, prefill, decode)")
    whatif.add_argument("--per-step", action="store_true", help="a row per step (placement: per step and device)")
    whatif.add_argument("--ep-size", type=int, default=None, help="placement: expert-parallel devices (default <= 8)")
    whatif.add_argument("--gpus-per-node", type=int, default=None, help="placement: devices per node (default all)")
    whatif.add_argument("--redundant-slots", type=int, default=0, help="placement: extra expert slots for replicas")
    whatif.add_argument("--policy", nargs="+", choices=[*POLICIES, "all"], default=None,
                        help="placement: one or more policies, or all (default map with --expert-map, else recorded when the run "
                             "recorded its expert -> device map, else contiguous)")
    whatif.add_argument("--expert-map", help="placement: device of each expert, e.g. 0,0,1,1 (replicas: 0+2)")
    whatif.add_argument("--expert-groups", type=int, default=1, help="placement: EPLB expert groups (default 1)")
    whatif.add_argument("--hidden-size", type=int, default=None, help="placement: hidden size, to report bytes")
    whatif.add_argument("--dtype", default="bfloat16", help="placement: dtype sent by the all-to-all (default bfloat16)")
    whatif.add_argument("--fit-steps", help="placement: LO:HI the load-aware policies are fitted on (default --steps)")
    whatif.add_argument("--cache-sizes", default="1,2,4", help="cache: experts held, e.g. 1,2,4 (default)")
    whatif.set_defaults(func=cmd_whatif)

    worker = sub.add_parser("worker", parents=[common], help="Celery ingest worker")
    worker.add_argument("--concurrency", type=int, default=1, help="Celery task concurrency (scheduled tasks)")
    worker.add_argument("--ingest-threads", type=int, default=None, help="stream consumer threads (default 2)")
    worker.set_defaults(func=cmd_worker)
    sub.add_parser("beat", parents=[common], help="Celery scheduler (compaction, retention, alerts)").set_defaults(func=cmd_beat)

    alerts = sub.add_parser("alerts", parents=[common],
                            help="list / add / delete / test alert rules, evaluate them, show events")
    alerts.add_argument("action", choices=["list", "add", "delete", "events", "evaluate", "test"],
                        help="what to do with the alert rules")
    alerts.add_argument("rule", nargs="?", help="delete / test: the rule's id (digits) or name")
    alerts.add_argument("--name", help="add: the new rule's name (not all digits); delete: the rule to delete")
    alerts.add_argument("--metric", help="add: maxvio, dead_experts, drop_rate, entropy or cv")
    alerts.add_argument("--comparison", default=">", choices=[">", ">=", "<", "<="])
    alerts.add_argument("--threshold", type=float, help="value the metric is compared with (add)")
    alerts.add_argument("--run", help="add: only this run; test: the run to replay; events: only this run")
    alerts.add_argument("--layer", type=int, help="only this layer (add; default: averaged over layers)")
    alerts.add_argument("--expert", type=int, help="only this expert (add; maxvio, dead_experts, drop_rate)")
    alerts.add_argument("--aggregation", default="window", choices=["step", "window", "ema"],
                        help="the series compared: each step, a rolling window, or a moving average (default window)")
    alerts.add_argument("--window", type=int, default=None, help="aggregation window: steps pooled (default 50)")
    alerts.add_argument("--ema-alpha", type=float, help="aggregation ema: weight of the newest step (0 < alpha <= 1)")
    alerts.add_argument("--ema-span", type=float, help="aggregation ema: span N, alpha = 2 / (N + 1)")
    alerts.add_argument("--for-evaluations", type=int, default=1, help="consecutive breaching steps before firing")
    alerts.add_argument("--webhook", help="http(s) URL that receives each event as JSON (add)")
    alerts.set_defaults(func=cmd_alerts)
    return parser


USER_ERRORS = (CliError, ValueError, PermissionError, FileNotFoundError)


@contextlib.contextmanager
def report_errors():
    """Turn a user mistake into a one-line message and exit status 2 (no traceback).

    Scripts that attach the probe can use it too: `with report_errors(): ...`.
    """
    try:
        yield
    except KeyboardInterrupt:
        sys.exit(130)
    except USER_ERRORS as exc:
        if get_settings().debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"moescope: error: {msg}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with report_errors():
        return args.func(args) or 0
    return EXIT_USAGE  # unreachable: report_errors exits


def entry() -> None:
    sys.exit(main())

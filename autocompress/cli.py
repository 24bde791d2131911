"""The ``autocompress`` command: a thin layer over the Python API.

Input errors print one line naming the field or file and exit with status 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from autocompress.errors import AutocompressError, InputError, NoFeasiblePolicy

EXIT_INPUT = 2
EXIT_NO_FEASIBLE = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autocompress",
        description="Find the compression policy of a timm Vision Transformer with the best accuracy that meets a "
        "measured latency or memory budget.",
    )
    parser.add_argument("--block-plugin", action="append", default=[], metavar="NAME",
                        help="do not load the plugin NAME (repeatable; also AUTOCOMPRESS_BLOCK_PLUGINS=a,b)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("search", help="search policies under a budget and write a run directory",
                       description="Search compression policies for the config's model under a budget. Writes "
                       "trials.csv, pareto.csv, best_policy.yaml, best_model.pt and the Optuna storage to --out.")
    s.add_argument("config", help="run config YAML (see examples/fashion_mnist.yaml)")
    s.add_argument("--trials", type=int, help="number of trials (default: the config's search.trials)")
    s.add_argument("--budget", help="latency=0.5x | latency_ms=X | memory_mb=X | memory=0.25x")
    s.add_argument("--sampler", choices=["tpe", "nsga2", "random"], help="Optuna sampler (default tpe)")
    s.add_argument("--seed", type=int, help="sampler and trial seed")
    s.add_argument("--space", help="search space file or builtin name (default: the config's)")
    s.add_argument("--out", help="run directory (default: the config's out)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out, keeping finished trials")
    s.add_argument("--backend", metavar="NAME",
                   help="optuna: trials in this process (default); ray: trials as Ray Tune trials on a Ray cluster; "
                        "or a plugin's backend")
    s.add_argument("--storage", metavar="URL",
                   help="share one study among several search processes (same command on each; --trials is the "
                        "total): journal:PATH or a file path (journal file on a local or shared disk), "
                        "postgresql://... or mysql://... (a database server). SQLite is not safe for concurrent "
                        "workers and is refused")
    r = s.add_argument_group("Ray (with --backend ray)")
    r.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster (e.g. HEAD_IP:6379 from `ray start --head`); default: start a local Ray")
    r.add_argument("--max-concurrent", type=int, metavar="N", help="at most N trials at a time (default: as many as "
                   "the cluster's CPUs allow)")
    r.add_argument("--cpus-per-trial", type=float, metavar="C", help="CPUs reserved per trial (default: the config's "
                   "target.threads, so trials on one node do not share cores while their latency is measured)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    a = sub.add_parser("apply", help="compress the config's model with a policy and save it",
                       description="Rebuild the compressed model a policy describes and save it (load it back with "
                       "autocompress.load_compressed).")
    a.add_argument("policy", help="policy YAML (e.g. RUN_DIR/best_policy.yaml)")
    a.add_argument("--config", required=True, help="run config YAML naming the model and checkpoint")
    a.add_argument("--out", required=True, help="file to write the compressed model to (.pt)")
    a.add_argument("--no-measure", action="store_true", help="skip measuring latency and accuracy")

    p = sub.add_parser("plugins", help="list installed technique plugins",
                       description="List the plugins found in the 'autocompress' entry-point group.")
    p.add_argument("--all", action="store_true",
                   help="also list plugins not loaded on purpose (blocked, or third-party with autoload disabled); "
                   "plugins that failed to load are always listed, with the reason")

    r = sub.add_parser("report", help="write the HTML report of a run directory",
                       description="Write RUN_DIR/report.html (self-contained: pictures embedded) and RUN_DIR/plots/*.png "
                       "from the run directory alone: trade-off plots with the Pareto front and the budget, best "
                       "accuracy over trials, the chosen policy layer by layer, the Pareto table and why trials failed. "
                       "Works on a run still in progress (reads study.db). A search writes it when it ends.")
    r.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `autocompress search`")
    pr = sub.add_parser("profile", help="profile the per-layer latency table a search's latency model uses",
                        description="Time every layer variant the installed techniques can produce in the config's "
                        "search space (format, rank, kept heads/width, ...) on the config's target (threads, batch "
                        "size, input shape), plus the uncompressed model end to end, and store the lookup table. "
                        "Entries already in the table are reused: a second run times nothing. The table is keyed by "
                        "CPU model, torch version, model and target; by default it lives in the user cache "
                        "($AUTOCOMPRESS_CACHE_DIR or ~/.cache/autocompress), where `autocompress search` finds it.")
    pr.add_argument("config", help="run config YAML (model, target, space)")
    pr.add_argument("--out", metavar="FILE", help="table file (default: the config's search.latency_table, else the "
                    "user cache)")
    pr.add_argument("--force", action="store_true", help="time everything again, replacing the table")
    pr.add_argument("--space", help="search space file or builtin name (default: the config's)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("cpu", help="what this CPU's kernels are (the kind every figure is keyed to)",
                   description="Print the CPU model, what torch dispatches to (get_cpu_capability), the flags that "
                   "decide bf16/int8 speed, any AVX2 caps (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) and the measured "
                   "speed of a bf16 GEMM against fp32 here.")
    ex = sub.add_parser("export", help="export a run's best model (or a policy's) to ONNX or OpenVINO IR",
                        description="Write the compressed model to an ONNX file (opset 18, dynamic batch) or an "
                        "OpenVINO IR (.xml + .bin): pruned and low-rank layers as smaller MatMul/Gemm, int8 layers as "
                        "QDQ int8 (ONNX Runtime and OpenVINO both run it in int8). The file is checked against the "
                        "torch model on validation images before it is written (fp32: max abs error <= 1e-4 of the "
                        "output scale; with int8 layers: top-1 agreement >= 99%%). Needs autocompress[onnx] or "
                        "autocompress[openvino].")
    ex.add_argument("source", metavar="RUN_DIR|POLICY", help="run directory (its best_model.pt and config.yaml), or "
                    "a policy YAML with --config")
    ex.add_argument("--config", help="run config YAML (needed with a policy; overrides RUN_DIR/config.yaml)")
    ex.add_argument("--format", required=True, metavar="FORMAT", help="onnx | openvino")
    ex.add_argument("--int8-weights", default="auto", metavar="TYPE",
                    help="auto | s8 | u8: the int8 layers' weight type (default auto: s8 where this CPU has VNNI, "
                    "2-3x faster there; u8 without, where s8 kernels saturate; build the file on the CPU it runs on)")
    ex.add_argument("--out", required=True, help="file to write: .onnx, or .xml for OpenVINO (the .bin goes beside it)")
    ex.add_argument("--check-images", type=int, default=1000, metavar="N",
                    help="validation images the check runs (default 1000)")
    for command in sub.choices.values():  # also accepted after the command: `autocompress search X --block-plugin Y`
        command.add_argument("--block-plugin", dest="block_plugin_after", action="append", default=[],
                             metavar="NAME", help="do not load the plugin NAME (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.block_plugin = [*args.block_plugin, *getattr(args, "block_plugin_after", [])]
    try:
        return _dispatch(args)
    except InputError as exc:
        print(f"autocompress: error: {' '.join(str(exc).split())}", file=sys.stderr)  # always one line
        return EXIT_INPUT
    except NoFeasiblePolicy as exc:
        print(f"autocompress: {exc}", file=sys.stderr)
        return EXIT_NO_FEASIBLE
    except AutocompressError as exc:
        print(f"autocompress: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("autocompress: interrupted; finished trials are saved (continue with --resume)", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "plugins":
        return _plugins(args)
    if args.command == "search":
        return _search(args)
    if args.command == "apply":
        return _apply(args)
    if args.command == "report":
        return _report(args)
    if args.command == "profile":
        return _profile(args)
    if args.command == "export":
        return _export(args)
    if args.command == "cpu":
        from autocompress.cpu import describe

        print(describe())
        return 0
    raise AssertionError(args.command)


def _profile(args: argparse.Namespace) -> int:
    from autocompress.latency_model.command import profile_command

    for line in profile_command(args.config, out=_from_cwd(args.out), force=args.force, space=_from_cwd(args.space),
                                progress=not args.no_progress, block=args.block_plugin):
        print(line)
    return 0


def _export(args: argparse.Namespace) -> int:
    from autocompress.export import check_target, export

    out = check_target(args.format, args.out)  # before any model is loaded
    _check_out_file(out)
    if args.check_images < 1:
        raise InputError("--check-images", f"must be at least 1, got {args.check_images}")
    export(_from_cwd(args.source), args.format, out, config=_from_cwd(args.config), check_images=args.check_images,
           block=args.block_plugin, int8_weights=args.int8_weights)
    return 0


def _report(args: argparse.Namespace) -> int:
    from autocompress.report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from autocompress.pluginmanager import load_plugins

    plugins = load_plugins(block=args.block_plugin)
    rows = []
    for info in plugins.info:
        if info.skipped and not args.all:
            continue
        stage = ",".join(sorted({plugins.techniques[t].stage.name.lower() for t in info.techniques})) or "-"
        rows.append((info.name, info.distribution, info.version, stage, ",".join(info.techniques) or "-", info.status))
    header = ("name", "distribution", "version", "stage", "techniques", "status")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row[:5], widths)) + "  " + row[5])
    runtimes = []
    for name, runtime in sorted(plugins.runtimes.items()):
        missing = runtime.missing()
        runtimes.append(f"{name} ({plugins.runtime_owners[name]}{': ' + missing if missing else ''})")
    print("runtimes (target.runtime): " + ", ".join(runtimes))
    for info in plugins.errors:  # a broken plugin is said on stderr too, so it is seen when stdout is piped
        print(f"autocompress: warning: plugin {info.name!r} ({info.distribution}) not loaded: {info.error}",
              file=sys.stderr)
    return 0


def _search(args: argparse.Namespace) -> int:
    from autocompress.config import load_config
    from autocompress.search import search

    config = load_config(args.config)
    if args.block_plugin:
        config.plugins.setdefault("block", [])
        config.plugins["block"] = list(config.plugins["block"]) + list(args.block_plugin)
    from autocompress.results import no_feasible_message

    result = search(
        config, budget=args.budget, trials=args.trials, sampler=args.sampler, seed=args.seed,
        space=_from_cwd(args.space), out=_from_cwd(args.out), resume=args.resume, backend=args.backend,
        progress=not args.no_progress, backend_options=_backend_options(args, args.backend or config.search.backend),
    )
    print(f"run directory: {result.run_dir}")
    if not result.feasible:
        raise NoFeasiblePolicy(no_feasible_message(result))
    return 0


def _backend_options(args: argparse.Namespace, backend: str) -> dict:
    """The options of the chosen backend; a Ray option without ``--backend ray`` is a mistake worth saying."""
    options: dict = {} if args.storage is None else {"storage": args.storage}
    ray_options = {"--ray-address": ("address", args.ray_address),
                   "--max-concurrent": ("max_concurrent", args.max_concurrent),
                   "--cpus-per-trial": ("cpus_per_trial", args.cpus_per_trial)}
    for flag, (key, value) in ray_options.items():
        if value is None:
            continue
        if backend != "ray":
            raise InputError(flag, "only applies with --backend ray")
        if key != "address" and not value > 0:
            raise InputError(flag, f"must be positive, got {value}")
        options[key] = value
    return options


def _from_cwd(value: str | None) -> str | None:
    """A path typed on the command line means from here, not from the config file's folder (where the config's own
    relative paths point). A bare name (``--space vit``) stays a name."""
    from autocompress.space import is_space_path

    if value is None or not is_space_path(value):
        return value
    return str(Path(value).expanduser().resolve())


def _check_out_file(out: Path) -> None:
    """Fail before any work when the output file cannot be written."""
    import tempfile

    if out.is_dir():
        raise InputError("--out", f"{out} is a directory; give a file name")
    folder = out.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise InputError("--out", f"cannot write {out}: {folder} is a file")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise InputError("--out", f"cannot write under {folder} ({exc.strerror or exc})") from None


def _apply(args: argparse.Namespace) -> int:
    from autocompress.compose import save_compressed
    from autocompress.config import load_config
    from autocompress.costs import compare_latency, memory_mb
    from autocompress.evaluate import accuracy
    from autocompress.inputs import example_batch
    from autocompress.pluginmanager import load_plugins
    from autocompress.policy import Policy
    from autocompress.runner import compress_policy
    from autocompress.runtime import check_runtime

    config = load_config(args.config)
    policy = Policy.load(args.policy)
    out = Path(args.out)
    _check_out_file(out)
    plugins = load_plugins(block=list(config.plugins.get("block", [])) + args.block_plugin)
    runtime = check_runtime(plugins, config.target.runtime, f"{config.source}.target.runtime")
    data, model, compressed = compress_policy(config, policy, plugins, source=args.policy)
    save_compressed(out, compressed, policy, config.model.name, config.model.kwargs)
    print(f"wrote {out}")
    if not args.no_measure:
        t = config.target
        example = example_batch(data, t.batch_size)
        runs = {"base": model, "compressed": compressed}
        if runtime.name != "torch":  # timed where the config says the model will run
            runs = {k: runtime.prepare(m, example, t.threads, plugins) for k, m in runs.items()}
        timing = compare_latency(runs, example, t.threads, t.warmup, t.repeats)
        base_ms, comp_ms = timing["base"].median_ms, timing["compressed"].median_ms  # interleaved: same load
        print(f"latency  {base_ms:8.2f} ms -> {comp_ms:8.2f} ms  ({base_ms / comp_ms:.2f}x, batch {t.batch_size}, "
              f"{t.threads} threads, {runtime.name})")
        print(f"memory   {memory_mb(model):8.3f} MB -> {memory_mb(compressed):8.3f} MB")
        print(f"val acc  {accuracy(model, data.val):8.4f}    -> {accuracy(compressed, data.val):8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``turbotrain <stage> ...``: one verb per pipeline stage. Snakemake rules call these and nothing else."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback

from turbotrain import contract
from turbotrain.config import load_config
from turbotrain.utils import joblog
from turbotrain.utils.errors import ConfigError, DataError

log = logging.getLogger("turbotrain")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=None, metavar="YAML",
                        help="pipeline config (default config/config.yaml); repeat to merge several in order, "
                             "as `snakemake --configfile A B` does")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=0.001 (repeatable)")
    parser.add_argument("--log", default=None, help="write all output to this file; a failure also shows its "
                        "last lines on the terminal (what the pipeline's rules pass)")
    parser.add_argument("--attempt", type=int, default=1, help="Snakemake's attempt number of this job (retries)")


def _dataset_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=None, metavar="NAME",
                        help="dataset.name or a key of extra_datasets (default: the primary dataset.name)")


def _cmd_generate(args, config):
    from turbotrain.stages import data

    summary = data.generate(config, args.out)
    print(json.dumps(summary, indent=2, default=str))


def _cmd_download(args, config):
    from turbotrain.stages import data

    print(data.download(config, args.out))


def _cmd_fuse(args, config):
    from turbotrain.stages import data

    summary = data.fuse(config, args.raw, args.split, args.out)
    print(json.dumps(summary, indent=2, default=str))


def _cmd_show(args, config):
    from turbotrain.stages import data

    data.show(config, args.cache, args.split, args.index, args.out)


def _budget_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", default=contract.SCHEDULE,
                   help=f"{contract.SCHEDULE} (every phase as configured) or a name of experiments.budgets")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fusion", required=True, choices=contract.FUSIONS)
    p.add_argument("--pretrain", required=True, help="name of a pretrain.variants entry")
    p.add_argument("--recipe", required=True, choices=contract.RECIPES)
    p.add_argument("--balancer", required=True, choices=contract.BALANCERS)
    p.add_argument("--label-fraction", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    _budget_arg(p)
    p.add_argument("--cache", required=True, help="fusion cache root of the dataset")


def _run_of(args, config):
    if args.recipe == "multistage" and args.balancer != contract.MULTISTAGE_BALANCER:
        raise ConfigError(f"--balancer {args.balancer}: the multistage recipe weights its losses by hand "
                          f"(finetune.multistage.stages[].loss_weights); use --balancer {contract.MULTISTAGE_BALANCER}")
    return contract.Run(config["dataset"]["name"], args.fusion, args.pretrain, args.recipe, args.balancer,
                        args.label_fraction, args.seed, args.budget)


def _cmd_pretrain(args, config):
    from turbotrain.stages.pretrain import pretrain

    print(json.dumps(pretrain(config, args.variant, args.fusion, args.cache, args.out, budget=args.budget), indent=2,
                     default=str))


def _cmd_train(args, config):
    from turbotrain.stages.finetune import finetune

    summary = finetune(config, _run_of(args, config), args.cache, args.pretrained, args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, indent=2, default=str))


def _cmd_evaluate(args, config):
    from turbotrain.stages.evaluate import evaluate

    print(json.dumps(evaluate(config, _run_of(args, config), args.checkpoint, args.cache, args.out), indent=2))


def _cmd_tables(args, config):
    from turbotrain.stages.report import write_tables

    print(write_tables(config, args.table, args.metrics, args.out).to_string())


def _cmd_figures(args, config):
    from turbotrain.stages.report import write_figure

    cache = os.path.dirname(contract.cache_dir(config, config["evaluation"]["split"]))
    write_figure(config, args.figure, args.metrics, args.out, args.cache or cache)


def _cmd_show_masking(args, config):
    from turbotrain.viz.pretraining import render_masking_example

    render_masking_example(config, args.cache, args.variant, args.checkpoint, args.out, fusion=args.fusion,
                           index=args.index, split=args.split)


def _cmd_dvc_yaml(args, config):
    from turbotrain.dvc import write_pipeline

    print("\n".join(write_pipeline(config, args.config, args.out, params_only=args.params_only)))


def _cmd_runs(args, config):
    for run in contract.expand_runs(config, args.table):
        print(run.metrics_path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turbotrain", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="write the embedded synthetic V2X dataset (OpenCOOD layout)")
    _common(p)
    _dataset_arg(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("download", help="fetch dataset archives (checksummed, resumable) and unpack them")
    _common(p)
    _dataset_arg(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("fuse", help="build the fusion cache of one split")
    _common(p)
    _dataset_arg(p)
    p.add_argument("--raw", required=True, help="OpenCOOD-layout dataset root")
    p.add_argument("--split", required=True)
    p.add_argument("--out", required=True, help="cache root (the split folder is created inside)")
    p.set_defaults(func=_cmd_fuse)

    p = sub.add_parser("show", help="draw one fused sample in bird's-eye view (PNG)")
    _common(p)
    _dataset_arg(p)
    p.add_argument("--cache", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("pretrain", help="pretraining of one variant (LiDAR and/or trajectory SSL); writes pretrained.pt")
    _common(p)
    p.add_argument("--variant", required=True, help="name of a pretrain.variants entry")
    p.add_argument("--fusion", required=True, choices=contract.TRAINED_FUSIONS)
    _budget_arg(p)
    p.add_argument("--cache", required=True, action="append",
                   help="fusion cache root of a pretraining dataset (repeat for a union; folder name = dataset name)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, pretrained.pt)")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("train", help="one fine-tuning run (multistage recipe or balanced joint training)")
    _common(p)
    _run_args(p)
    p.add_argument("--pretrained", default=None, help="pretrained.pt to start from")
    p.add_argument("--out", required=True, help="run directory; a rerun resumes from its last checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="detection AP and prediction metrics of a checkpoint -> metrics JSON")
    _common(p)
    _run_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("tables", help="build one results table (CSV + Markdown) from metrics files")
    _common(p)
    p.add_argument("--table", required=True, choices=contract.TABLES)
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_tables)

    p = sub.add_parser("figures", help="draw one results figure (PNG)")
    _common(p)
    p.add_argument("--figure", required=True,
                   choices=contract.FIGURES)
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--cache", default=None, help="fusion cache root (qualitative figure)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_figures)

    p = sub.add_parser("show-masking", help="draw masked cells and reconstructed vs real points of one sample")
    _common(p)
    p.add_argument("--variant", required=True, help="name of a pretrain.variants entry")
    p.add_argument("--fusion", default="attfuse", choices=contract.TRAINED_FUSIONS)
    p.add_argument("--cache", required=True)
    p.add_argument("--checkpoint", default=None,
                   help="the pretraining run's objective.pt or last.pt (pretrained.pt lacks the decoder); none = untrained")
    p.add_argument("--split", default="val")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_show_masking)

    p = sub.add_parser("dvc-yaml", help="write dvc.yaml (DVC stages) and params.yaml (their params) from the contract")
    _common(p)
    p.add_argument("--out", default="dvc.yaml", help="dvc.yaml to write; params.yaml (the merged config) goes beside it")
    p.add_argument("--params-only", action="store_true",
                   help="rewrite params.yaml only, failing if dvc.yaml is not current (the `params` DVC stage)")
    p.set_defaults(func=_cmd_dvc_yaml)

    p = sub.add_parser("runs", help="list the runs of the experiment grid (metrics paths)")
    _common(p)
    p.add_argument("--table", default=None)
    p.set_defaults(func=_cmd_runs)
    return parser


# Failures that repeat on every attempt of the same command (a retry cannot fix them): exit status
# 2 for bad config or data, 3 for a numerical failure (a NaN/inf loss or gradient).
DETERMINISTIC_FAILURES = {ConfigError: 2, DataError: 2, FloatingPointError: 3}


def _run(args) -> tuple[int, str]:
    """Run the verb: ``(exit status, error message)``, the message empty on success."""
    try:
        args.config = args.config or ["config/config.yaml"]
        config = load_config(args.config, args.overrides)
        if getattr(args, "dataset", None) is not None:
            config = contract.with_dataset(config, args.dataset)
        args.func(args, config)
    except tuple(DETERMINISTIC_FAILURES) as exc:
        status = next(code for cls, code in DETERMINISTIC_FAILURES.items() if isinstance(exc, cls))
        return status, f"turbotrain {args.command}: error: {exc}"
    return 0, ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.log is None:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=LOG_FORMAT)
        status, message = _run(args)
        if message:
            print(message, file=sys.stderr)
        return status
    return _run_logged(args, list(sys.argv[1:] if argv is None else argv))


def _run_logged(args, argv: list[str]) -> int:
    """The verb with all output in ``args.log`` (see :mod:`turbotrain.utils.joblog`)."""
    log_path = joblog.rank_log(args.log)
    command = [a for i, a in enumerate(argv) if a != "--attempt" and (i == 0 or argv[i - 1] != "--attempt")]
    joblog.prepare_attempt(log_path, args.attempt)
    earlier = joblog.earlier_deterministic_failure(log_path, args.attempt, command)
    with joblog.redirected(log_path):
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=LOG_FORMAT, force=True)
        if earlier is not None:
            status, message = 2, (f"turbotrain {args.command}: not retried (attempt {args.attempt}): attempt "
                                  f"{earlier['attempt']} of this same command failed in a way a retry cannot fix "
                                  f"({earlier['error']}); see {earlier['log']}")
        else:
            try:
                status, message = _run(args)
            except Exception:  # an unexpected failure may be transient (I/O, a lost node): retry it
                traceback.print_exc()
                status, message = 1, f"turbotrain {args.command}: failed (traceback in {log_path})"
            if status:
                joblog.record_failure(log_path, args.attempt, command, status in (2, 3), message)
        if message:
            print(message, file=sys.stderr)
    if status:
        # stdout and stderr are the terminal's (or the SLURM job's) again
        joblog.keep_attempt_log(log_path, args.attempt)
        print(f"--- last lines of {log_path} ---\n{joblog.tail(log_path)}", file=sys.stderr, end="")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""`sdjax train CONFIG --workdir DIR [--set key=value ...]`: run or resume a training run."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from sdjax.cli import add_process_arguments, join_processes
from sdjax.errors import ConfigError, SdjaxError
from sdjax.train import config as config_lib
from sdjax.train.config import TrainConfig, describe


def _config_keys_help() -> str:
    rows = [f"  {key} = {value!r}\n      {text}" for key, value, text in describe(TrainConfig())]
    return "config keys for --set (with TrainConfig's defaults):\n" + "\n".join(rows)


def _log_to_stderr(logger: logging.Logger) -> None:
    """sdjax's notes (resume, export, skipped features) at INFO on stderr; other libraries stay at WARNING."""
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a root handler installed by a library would print every line twice


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdjax train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the Stable Diffusion U-Net (or the VAE) from an experiment config. A workdir that "
                    "already holds checkpoints of the same model is resumed from its latest one, including "
                    "optimizer state, EMA, step and data position. SIGTERM/SIGINT save a checkpoint and exit 0.",
        epilog=_config_keys_help())
    parser.add_argument("config", help="experiment file defining get_config() -> TrainConfig (e.g. "
                                       "experiments/train_tiny/config.py), or a run's config.json")
    parser.add_argument("--workdir", required=True,
                        help="run directory for checkpoints, metrics.jsonl, samples/ and export/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set optimizer.learning_rate=3e-4 (repeatable; "
                             "tuples: a|b|c)")
    parser.add_argument("--mesh", metavar="data=N,fsdp=M",
                        help="the devices to train on (the mesh config key): the batch splits over all of them, "
                             "params, optimizer state and EMA over fsdp")
    add_process_arguments(parser)
    parser.add_argument("--allow-changed-settings", action="store_true",
                        help="resume a run with other settings than its config.json (the change is listed in "
                             "runs.jsonl, the new settings in config.step_<N>.json; config.json is kept)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as JSON and exit without training")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not use JAX's persistent compilation cache (default: $SDJAX_CACHE_DIR or "
                             "~/.cache/sdjax/jax-compilation), which lets a resumed run skip most of the compile")
    return parser


def main(argv=None) -> int:
    """Entry point; returns the process exit code (0: finished or stopped cleanly, 2: bad config, 1: error)."""
    args = build_parser().parse_args(argv)
    _log_to_stderr(logging.getLogger("sdjax"))
    try:
        join_processes(args)  # before anything touches a device
        overrides = args.overrides + ([f"mesh={args.mesh}"] if args.mesh else [])
        config = config_lib.load_config(args.config, overrides)
        if args.print_config:
            print(json.dumps(config_lib.to_dict(config), indent=2))
            return 0
        from sdjax.train.loop import train  # the models and the loop load only when training
        if not args.no_compile_cache:
            from sdjax import compile_cache
            compile_cache.enable()
        result = train(config, args.workdir, allow_changed_settings=args.allow_changed_settings)
    except ConfigError as err:
        print(f"sdjax train: config error: {err}", file=sys.stderr)
        return 2
    except SdjaxError as err:
        print(f"sdjax train: {err}", file=sys.stderr)
        return 1
    how = f"stopped by {result.stopped_by_signal}" if result.stopped_by_signal else "finished"
    print(f"sdjax train: {how} at step {result.step}; run directory {args.workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

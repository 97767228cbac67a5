"""AuxNet: boundary-aware semantic segmentation, configured by one YAML file.

commands:
  train    train a network (the default command); a run folder that holds last.pth is resumed
  eval     evaluate a checkpoint on its own test split: needs MODEL_WEIGHTS=<checkpoint>
  predict  segment images with a checkpoint: needs MODEL_WEIGHTS=<checkpoint> and INPUT=<image, folder,
           'glob*.tif' or list.txt>

Every option is a KEY=VALUE on the command line or a key of the --config file (configs/config.yaml
lists them all, with their defaults and meanings). eval and predict take the network, data and split
from the checkpoint: only the options that concern them (devices, thresholds, INPUT, OUTPUT, ...) are
read from the command line.

One process runs per GPU (or CPU_PROCESSES on the CPU, GPUs=[]), or each joins a torchrun launch.
"""

from __future__ import annotations

import signal

if __name__ == "__mp_main__":  # a spawned process (a rank, or a rank's data worker) importing this file:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C while it starts is its launcher's to handle
    # (ranks take Ctrl-C back once they run: engines.launch._spawned)

import argparse  # noqa: E402
import sys  # noqa: E402

from tqdm import tqdm  # noqa: E402

from configs import ConfigError, load_config  # noqa: E402
from engines import evaluate, predict_ddp, train  # noqa: E402
from engines.launch import INTERRUPTED  # noqa: E402
from utils.util import RunError  # noqa: E402

#: Each command: ``run(cfg, overrides) -> exit status`` (each runs one process per device, or joins a
#: ``torchrun`` launch).
COMMANDS = {"train": train.run, "eval": evaluate.run, "predict": predict_ddp.run}


USAGE = "python main.py [train | eval | predict] [--config FILE] [KEY=VALUE ...]"
EXAMPLES = """examples:
  python main.py                                            train the default job (synthetic data)
  python main.py DATASET_DIR=data/cells TRAIN_EPOCHS=30     train on a folder holding images/ and masks/
  python main.py --config configs/experiments/smoke.yaml    train with another configuration file
  python main.py eval MODEL_WEIGHTS=saved/default/run_001/best
  python main.py predict MODEL_WEIGHTS=saved/default/run_001/best INPUT='scenes/*.tif' OUTPUT=masks
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    parser = argparse.ArgumentParser(prog="main.py", usage=USAGE, description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="the YAML configuration (default: configs/config.yaml); optional for every command")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="set an option; values are YAML: BATCH_SIZE=4 'GPUs=[0,1]' 'TEST_IDS=[f16, f17]'")
    args = parser.parse_args(argv)
    args.command = command
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status: 0, 2 (bad input, said in one line) or 130 (Ctrl-C)."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run_command(args)
    except KeyboardInterrupt as err:  # Ctrl-C: the run lock and temporary files are already cleaned up
        for bar in list(getattr(tqdm, "_instances", ())):  # the bars it cut short: the line is the message's
            bar.close()
        print(f"interrupted: {err}" if str(err) else "interrupted", file=sys.stderr)
        return INTERRUPTED


def run_command(args: argparse.Namespace) -> int:
    """Load the configuration and dispatch ``args.command``; returns the exit status (a problem found
    before the command starts, in the configuration or MODEL_WEIGHTS, is one line and status 2)."""
    try:
        return COMMANDS[args.command](load_config(args.config, args.overrides), args.overrides)
    except (ConfigError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

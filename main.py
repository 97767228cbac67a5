"""AuxNet command line.

    python main.py [train] [--config FILE] [KEY=VALUE ...]     train (the default command)
    python main.py eval --config FILE MODEL_WEIGHTS=... [...]   evaluate a checkpoint on the test split
    python main.py predict MODEL_WEIGHTS=... INPUT=<image or folder> [OUTPUT=...] [GATING=true|false]

Spawns one process per GPU (or CPU_PROCESSES on the CPU) for DDP, or joins a ``torchrun`` launch.
Every option can be set in the YAML file or as KEY=VALUE; see configs/config.yaml.
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    parser = argparse.ArgumentParser(prog="main.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: configs/config.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override any config option")
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

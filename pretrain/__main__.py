"""python -m pretrain --config FILE [key=value ...]  (also under torchrun: one process per device).

    python -m pretrain --config configs/pretrain/tiny_v3.yaml train.steps=50 parallel.ep=2
    torchrun --nproc-per-node 4 -m pretrain --config configs/pretrain/tiny_v3.yaml
"""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config, print_error, user_errors


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0 done, 2 a user's mistake (one `error:` line, no traceback), 3 stopped on non-finite
    losses. A mistake in the config, a data file, a tokenizer or a checkpoint is reported once, by rank 0."""
    ap = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True,
                    help="YAML file (sections model, parallel, train, data, checkpoint, logging)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 parallel.pp=2")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print_error(e)
        return 2
    from .session import NonFiniteError
    from .train import train
    try:
        return train(cfg)
    except NonFiniteError as e:
        print_error(e)
        return 3
    except user_errors() as e:
        print_error(e)
        return 2


if __name__ == "__main__":
    sys.exit(main())

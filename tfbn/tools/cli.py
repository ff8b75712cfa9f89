"""Command line for the BN inference tools, on saved `.keras` models.

    python -m tfbn.tools fold MODEL.keras OUT.keras
    python -m tfbn.tools recompute-statistics MODEL.keras OUT.keras --data x.npy
    python -m tfbn.tools convert MODEL.keras OUT.keras --to tfbn
    python -m tfbn.tools audit MODEL.keras [--data x.npz] [--format json]

`--data` is a `.npy` array of model inputs, or a `.npz` archive read with
`--data-key` (default: its only array); it is cut into `--batch-size` batches.
"""

from __future__ import annotations

import argparse
import sys

import keras
import numpy as np

import tfbn  # noqa: F401  Registers tfbn's layers for loading.
from tfbn.tools import auditing, conversion, folding, population_statistics


def load_batches(path: str, batch_size: int, key: str | None = None) -> list[np.ndarray]:
    """Reads model inputs from `.npy`/`.npz` and splits them into batches.

    Raises:
        ValueError: For a bad batch size, or an ambiguous/missing `.npz` key.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; received {batch_size}.")
    loaded = np.load(path)
    if isinstance(loaded, np.ndarray):
        inputs = loaded
    else:
        with loaded:
            names = list(loaded.keys())
            if key is None and len(names) != 1:
                raise ValueError(f"{path} holds arrays {names}; choose one with --data-key.")
            key = key or names[0]
            if key not in names:
                raise ValueError(f"{path} has no array {key!r}; it holds {names}.")
            inputs = loaded[key]
    return [inputs[start : start + batch_size] for start in range(0, len(inputs), batch_size)]


def _fold(args) -> int:
    model = keras.models.load_model(args.model)
    folded, decisions = folding.fold_batch_norm(model, return_report=True)
    for decision in decisions:
        if decision.reason is None:
            print(f"folded {decision.batch_norm} into {decision.folded_into}")
        else:
            print(f"kept {decision.batch_norm} as ChannelAffine: {decision.reason}")
    folded.save(args.output)
    return 0


def _recompute(args) -> int:
    model = keras.models.load_model(args.model)
    batches = load_batches(args.data, args.batch_size, args.data_key)
    population_statistics.recompute_statistics(
        model, batches, num_batches=args.num_batches, progress=not args.quiet
    )
    model.save(args.output)
    return 0


def _convert(args) -> int:
    model = keras.models.load_model(args.model)
    conversion.convert_batch_norm(model, to=args.to).save(args.output)
    return 0


def _audit(args) -> int:
    model = keras.models.load_model(args.model)
    batches = load_batches(args.data, args.batch_size, args.data_key) if args.data else None
    report = auditing.audit(model, batches, num_batches=args.num_batches)
    text = report.to_json() if args.format == "json" else report.to_text()
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
    else:
        print(text)
    return 1 if args.fail_on_error and report.count("error") else 0


def _add_data_arguments(parser, required: bool) -> None:
    parser.add_argument("--data", required=required, help="Model inputs: .npy, or .npz.")
    parser.add_argument("--data-key", help="Array name inside a .npz file.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-batches", type=int, default=None, help="Default: all.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tfbn.tools", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    fold = commands.add_parser("fold", help="Fold BN into Conv/Dense for inference.")
    fold.add_argument("model")
    fold.add_argument("output")
    fold.set_defaults(run=_fold)

    recompute = commands.add_parser(
        "recompute-statistics", help="Set BN moving statistics to population statistics."
    )
    recompute.add_argument("model")
    recompute.add_argument("output")
    _add_data_arguments(recompute, required=True)
    recompute.add_argument("--quiet", action="store_true", help="No progress bar.")
    recompute.set_defaults(run=_recompute)

    convert = commands.add_parser("convert", help="Swap BN layers between tfbn and Keras.")
    convert.add_argument("model")
    convert.add_argument("output")
    convert.add_argument("--to", choices=("tfbn", "keras"), required=True)
    convert.set_defaults(run=_convert)

    audit = commands.add_parser("audit", help="Report BN mistakes.")
    audit.add_argument("model")
    _add_data_arguments(audit, required=False)
    audit.add_argument("--format", choices=("text", "json"), default="text")
    audit.add_argument("--output", help="Write the report here instead of stdout.")
    audit.add_argument(
        "--fail-on-error", action="store_true", help="Exit with 1 if any finding is an error."
    )
    audit.set_defaults(run=_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand; returns the process exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""Command line for the BN inference tools, on saved `.keras` models.

    python -m tfbn.tools fold MODEL.keras OUT.keras
    python -m tfbn.tools recompute-statistics MODEL.keras OUT.keras --data x.npy
    python -m tfbn.tools convert MODEL.keras OUT.keras --to tfbn
    python -m tfbn.tools audit MODEL.keras [--data x.npz] [--format json]

`--data` is a `.npy` array of model inputs, or a `.npz` archive read with
`--data-key` (default: its only array); it is cut into `--batch-size` batches.

User errors (a missing or invalid file, data whose shape the model cannot
take, a bad option value) end the command with one line on stderr,
`tfbn-tools: error: ...`, and exit status 2. The library's messages name
Python arguments; this module rewrites them to the flags that set them.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import zipfile

import keras
import numpy as np

import tfbn  # noqa: F401  Registers tfbn's layers for loading.
from tfbn.tools import auditing, conversion, folding, population_statistics

# Python argument names in library errors -> the flags that set them here.
_FLAG_OF_ARGUMENT = {
    "num_batches": "--num-batches",
    "batch_size": "--batch-size",
    "to": "--to",
}
_MAX_MESSAGE = 400


class UsageError(Exception):
    """A mistake in the command line or its input files; reported in one line."""


def load_model(path: str):
    """Loads a `.keras` model, with a one-line error for a bad file.

    Args:
        path: The model file.

    Returns:
        The loaded Keras model.

    Raises:
        UsageError: When `path` does not exist, or exists but is not a valid
            Keras model file.
    """
    if not os.path.exists(path):
        raise UsageError(f"model file {path} does not exist.")
    if os.path.isdir(path):
        raise UsageError(f"model file {path} is a directory; pass a .keras file.")
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        # Keras would say "File not found" for a file that is there.
        raise UsageError(
            f"model file {path} is invalid: a .keras model is a zip archive and this "
            "file is not one. Pass a file written by model.save()."
        )
    try:
        return keras.models.load_model(path)
    except Exception as error:  # Keras raises many types for a corrupt file.
        reason = _first_line(error)
        detail = "" if "not found" in reason.lower() else f" ({type(error).__name__}: {reason})"
        raise UsageError(
            f"model file {path} is invalid: it could not be loaded as a Keras model"
            f"{detail}. Pass a .keras file written by model.save()."
        ) from error


def load_batches(path: str, batch_size: int, key: str | None = None) -> list[np.ndarray]:
    """Reads model inputs from `.npy`/`.npz` and splits them into batches.

    Args:
        path: A `.npy` array, or a `.npz` archive of arrays.
        batch_size: Rows per batch (the last batch may be smaller).
        key: The array to use inside a `.npz` archive; None for its only one.

    Returns:
        The batches, in order.

    Raises:
        ValueError: For a bad batch size, or an ambiguous/missing `.npz` key.
        UsageError: For a missing or invalid data file, or a 0-d array.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; received {batch_size}.")
    if not os.path.isfile(path):
        raise UsageError(f"data file {path} does not exist.")
    try:
        loaded = np.load(path)
    except (ValueError, OSError) as error:
        raise UsageError(
            f"data file {path} is invalid: it is not a .npy or .npz file NumPy can "
            f"read without pickle ({_first_line(error)})."
        ) from error
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
    if inputs.ndim == 0:
        raise UsageError(f"data file {path} holds a single number; it needs a batch axis.")
    return [inputs[start : start + batch_size] for start in range(0, len(inputs), batch_size)]


def check_inputs_fit(model, batches: list[np.ndarray], path: str) -> None:
    """Checks that the data's shape fits a single-input model's input.

    Args:
        model: The loaded model.
        batches: Batches from `load_batches`.
        path: The data file, for the message.

    Raises:
        UsageError: For a rank or a dimension that the model cannot take.
    """
    if not batches or len(model.inputs) != 1:
        return  # Multi-input models: leave the check to the model.
    expected = tuple(model.inputs[0].shape)
    received = batches[0].shape
    fits = len(received) == len(expected) and all(
        want is None or want == got for want, got in zip(expected[1:], received[1:])
    )
    if not fits:
        shown = tuple("batch" if d is None else d for d in expected)
        raise UsageError(
            f"data in {path} has shape {(None,) + tuple(received[1:])} per batch (rank "
            f"{len(received)}), but model {model.name!r} takes inputs of shape {shown} "
            f"(rank {len(expected)}). Save the inputs with that shape."
        )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def flag_message(message: str) -> str:
    """A library error message with Python argument names replaced by flags.

    Args:
        message: The text of an exception raised by `tfbn.tools`.

    Returns:
        One line, at most a few hundred characters, naming `--num-batches`
        where the library said `num_batches` (and likewise for every flag).
    """
    text = " ".join(message.split())
    for argument, flag in _FLAG_OF_ARGUMENT.items():
        text = text.replace(f"`{argument}`", flag)
        if "_" in argument:  # Bare names like "to" are ordinary words too.
            text = re.sub(rf"\b{argument}\b", flag, text)
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    return text


def _fold(args) -> int:
    model = load_model(args.model)
    folded, decisions = folding.fold_batch_norm(model, return_report=True)
    for decision in decisions:
        if decision.reason is None:
            print(f"folded {decision.batch_norm} into {decision.folded_into}")
        else:
            print(f"kept {decision.batch_norm} as ChannelAffine: {decision.reason}")
    folded.save(args.output)
    return 0


def _recompute(args) -> int:
    model = load_model(args.model)
    batches = load_batches(args.data, args.batch_size, args.data_key)
    check_inputs_fit(model, batches, args.data)
    population_statistics.recompute_statistics(
        model, batches, num_batches=args.num_batches, progress=not args.quiet
    )
    model.save(args.output)
    return 0


def _convert(args) -> int:
    model = load_model(args.model)
    conversion.convert_batch_norm(model, to=args.to).save(args.output)
    return 0


def _audit(args) -> int:
    model = load_model(args.model)
    batches = None
    if args.data:
        batches = load_batches(args.data, args.batch_size, args.data_key)
        check_inputs_fit(model, batches, args.data)
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
    """Runs one subcommand; returns the process exit status.

    User errors (a missing or invalid file, data of the wrong shape, a bad
    option value) print one line, `tfbn-tools: error: ...`, to stderr and
    return 2, with the library's Python argument names given as this
    command's flags. Other exceptions propagate with their traceback.

    Args:
        argv: The arguments after the program name; None reads `sys.argv`.

    Returns:
        0 on success, 1 for `audit --fail-on-error` with errors, 2 for a
        user error (argparse's own errors exit with 2 as well).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, ValueError, TypeError, OSError) as error:
        print(f"tfbn-tools: error: {flag_message(str(error))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

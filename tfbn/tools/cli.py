"""Command line for the BN inference tools, on saved `.keras` models.

    python -m tfbn.tools fold MODEL.keras OUT.keras
    python -m tfbn.tools recompute-statistics MODEL.keras OUT.keras --data x.npy
    python -m tfbn.tools convert MODEL.keras OUT.keras --to tfbn
    python -m tfbn.tools audit MODEL.keras [--data x.npz] [--format json]

`--data` is a `.npy` array of model inputs, or a `.npz` archive read with
`--data-key` (default: its only array); it is cut into `--batch-size` batches.

User errors (a missing or invalid file, data whose shape the model cannot
take or that holds NaN, statistics that cannot be folded, a bad option
value) end the command with one line on stderr, `tfbn-tools: error: ...`,
and exit status 2, before any output file is written. The library's
messages name Python arguments; this module rewrites them to the flags that
set them. Any other error also prints one line and exits with 1;
`--traceback` shows its Python traceback instead.

`fold` prints each BN layer's fate, with a stable reason code in brackets
for those kept as `ChannelAffine` (`FoldDecision.reason_code`), then a count
by reason code.
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
    if os.path.isdir(path):
        raise UsageError(f"data file {path} is a directory; pass a .npy or .npz file.")
    if not os.path.isfile(path):
        raise UsageError(f"data file {path} does not exist.")
    try:
        loaded = np.load(path)
    except Exception as error:  # NumPy raises ValueError, OSError, BadZipFile, EOFError...
        raise UsageError(
            f"data file {path} is invalid: it is not a .npy or .npz file NumPy can "
            f"read without pickle ({type(error).__name__}: {_first_line(error)})."
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
            try:
                inputs = loaded[key]
            except Exception as error:  # A damaged member of the archive.
                raise UsageError(
                    f"data file {path} is invalid: its array {key!r} cannot be read "
                    f"({type(error).__name__}: {_first_line(error)})."
                ) from error
    if inputs.ndim == 0:
        raise UsageError(f"data file {path} holds a single number; it needs a batch axis.")
    if not (np.issubdtype(inputs.dtype, np.number) or inputs.dtype == np.bool_):
        raise UsageError(
            f"data file {path} holds {inputs.dtype} values; model inputs must be numbers. "
            "Save the inputs as a numeric array (e.g. float32)."
        )
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
    if len(model.inputs) != 1:
        raise UsageError(
            f"model {model.name!r} takes {len(model.inputs)} inputs, but --data feeds "
            "one array. Use the Python API (tfbn.tools) for multi-input models."
        )
    if not batches:
        return
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


def check_output(path: str) -> None:
    """Checks, before any work, that a model can be saved to `path`.

    Args:
        path: The output model file.

    Raises:
        UsageError: For a directory, a missing parent directory or a suffix
            Keras cannot save.
    """
    if os.path.isdir(path):
        raise UsageError(f"output {path} is a directory; pass a file name ending in .keras.")
    if not path.endswith((".keras", ".h5")):
        raise UsageError(
            f"output {path} must end in .keras (the Keras model format) or the legacy .h5."
        )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"output {path}: directory {parent} does not exist; create it first.")


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
    check_output(args.output)
    model = load_model(args.model)
    folded, decisions = folding.fold_batch_norm(model, return_report=True)
    for decision in decisions:
        if decision.reason is None:
            print(f"folded {decision.batch_norm} into {decision.folded_into}")
        else:
            print(
                f"kept {decision.batch_norm} as ChannelAffine [{decision.reason_code}]: "
                f"{decision.reason}"
            )
    counts = folding.fold_reason_counts(decisions)
    folded_count = sum(decision.reason is None for decision in decisions)
    summary = ", ".join(f"{code}: {count}" for code, count in counts.items())
    print(
        f"{folded_count} of {len(decisions)} BN layers folded"
        + (f"; kept {summary}" if summary else "")
    )
    folded.save(args.output)
    return 0


def _recompute(args) -> int:
    check_output(args.output)
    model = load_model(args.model)
    batches = load_batches(args.data, args.batch_size, args.data_key)
    check_inputs_fit(model, batches, args.data)
    population_statistics.recompute_statistics(
        model, batches, num_batches=args.num_batches, progress=not args.quiet
    )
    model.save(args.output)
    return 0


def _convert(args) -> int:
    check_output(args.output)
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


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors in the command's one-line format."""

    def error(self, message):
        print(
            f"tfbn-tools: error: {message} (run `{self.prog} --help` for usage)",
            file=sys.stderr,
        )
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="tfbn-tools", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="Show the Python traceback of an unexpected error (for bug reports).",
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
    command's flags. Any other error also prints one line (its type and
    message) and returns 1; `--traceback` lets it propagate instead.

    Args:
        argv: The arguments after the program name; None reads `sys.argv`.

    Returns:
        0 on success, 1 for `audit --fail-on-error` with errors or an
        unexpected error, 2 for a user error (argparse's own errors exit
        with 2 as well).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, ValueError, TypeError, OSError) as error:
        print(f"tfbn-tools: error: {flag_message(str(error))}", file=sys.stderr)
        return 2
    except Exception as error:
        if args.traceback:
            raise
        message = flag_message(f"{type(error).__name__}: {_first_line(error)}")
        print(
            f"tfbn-tools: error: unexpected {message} (rerun with --traceback for details)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())

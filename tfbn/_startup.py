"""Quiet TensorFlow start-up for tfbn's command-line programs (standard library only).

TensorFlow prints C++ lines while it loads and looks for devices: absl's banner,
INFO lines written before absl is initialised (these ignore
`TF_CPP_MIN_LOG_LEVEL`), a CPU-feature note and, on every machine without a GPU,
`E0000 ... failed call to cuInit`. None of them is actionable, and the last looks
like a failure. tfbn's programs (`train.py`, `tfbn-tools`, `python -m tfbn.tools`,
`python -m tfbn.experiments`) hold them back; a library user's `import tfbn` is
left alone, and so is anyone who set `TF_CPP_MIN_LOG_LEVEL` themselves.

This module must not import TensorFlow: it runs before it is loaded.
"""

import contextlib
import os
import re
import sys
import tempfile

# Set by an entry point (train.py) before it imports tfbn.
OPT_IN_VARIABLE = "TFBN_QUIET_STARTUP"

_PROGRAMS = ("tfbn-tools",)
_MODULES = ("tfbn.tools", "tfbn.experiments")

_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|I\d{4} \S+ +\d+ \S+:\d+\] "
    r"|To enable the following instructions: "
    r"|E\d{4} \S+ +\d+ \S+:\d+\] failed call to cuInit"
)


def _is_tfbn_program() -> bool:
    if os.environ.get(OPT_IN_VARIABLE) == "1":
        return True
    if os.path.basename(sys.argv[0] if sys.argv else "") in _PROGRAMS:
        return True
    arguments = getattr(sys, "orig_argv", [])
    return any(
        flag == "-m" and module in _MODULES for flag, module in zip(arguments, arguments[1:])
    )


# Decided once, before TensorFlow is imported; the user's own setting always wins.
ENABLED = "TF_CPP_MIN_LOG_LEVEL" not in os.environ and _is_tfbn_program()
if ENABLED:
    # C++ errors still show; INFO and WARNING lines (e.g. the input pipeline's
    # "End of sequence" at each epoch) do not.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"


@contextlib.contextmanager
def quiet_tensorflow_startup():
    """Holds back TensorFlow's start-up noise on stderr, then replays everything else.

    File descriptor 2 itself is redirected, because the lines come from C++.
    A no-op unless `ENABLED`.

    Yields:
        None.
    """
    if not ENABLED:
        yield
        return
    sys.stderr.flush()
    original = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(original, 2)
            os.close(original)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not _NOISE.match(line)))
            sys.stderr.flush()

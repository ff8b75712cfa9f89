"""The `train.py` command line for tests that run the trainer as a real process."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(*flags: str) -> list[str]:
    """`python train.py --flagfile=configs/smoke.flags <flags>` with this interpreter.

    Args:
        *flags: Further flags; later flags override the smoke configuration.

    Returns:
        The argument list for `subprocess`.
    """
    return [
        sys.executable,
        os.path.join(REPO, "train.py"),
        f"--flagfile={REPO}/configs/smoke.flags",
        *flags,
    ]

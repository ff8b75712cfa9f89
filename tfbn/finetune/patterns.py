"""Scope patterns: regexes `re.match`-ed against nested variable paths.

A pattern such as `backbone/` selects every path that starts with it
(`backbone/conv1/kernel`): TF1's scope-prefix semantics. The paths are the
nested layer paths of `tfbn.layers.introspection.nested_variable_paths`
(sub-model / layer / weight), which survive a `.keras` save and load; a flat
model's paths are its layer names (`Conv_1/kernel`, `predictions/bias`). Every pattern must
match at least one path, so a typo is an error that lists the known
prefixes, never a silent no-op that freezes or trains the wrong part. The
update plan (`update_part`, `freeze_part`) and the partial restore
(`restore_part`, `restore_exclude`) both select paths with `select`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

# Prefixes quoted in an error at most; a large model has hundreds.
MAX_QUOTED_PREFIXES = 30


def known_prefixes(paths: Sequence[str], depth: int = 2) -> list[str]:
    """The distinct path prefixes up to `depth` components, for error messages.

    Args:
        paths: Variable or layer paths such as `backbone/conv1/kernel`.
        depth: How many leading components a prefix keeps at most.

    Returns:
        The sorted prefixes, each ending in `/`; the paths themselves when
        none has a `/`.
    """
    prefixes = set()
    for path in paths:
        parts = path.split("/")
        for size in range(1, min(depth, len(parts) - 1) + 1):
            prefixes.add("/".join(parts[:size]) + "/")
    return sorted(prefixes) or sorted(paths)


def describe_prefixes(paths: Sequence[str], near: str | None = None) -> str:
    """The known prefixes for an error message: the closest to `near` first, then at most 30.

    Args:
        paths: Variable paths.
        near: A pattern that matched nothing; the prefixes most like it are
            named first ("did you mean").

    Returns:
        The text, e.g. `['backbone/', 'head/']` or `['Conv_1/', ...] (and 80 more)`.
    """
    prefixes = known_prefixes(paths)
    text = ""
    if near:
        close = difflib.get_close_matches(near, prefixes, n=3, cutoff=0.5)
        if close:
            text = f"closest: {close}; "
    shown = prefixes[:MAX_QUOTED_PREFIXES]
    more = len(prefixes) - len(shown)
    return text + f"{shown}" + (f" (and {more} more)" if more else "")


def matching(paths: Sequence[str], patterns: Sequence[str], argument: str) -> list[str]:
    """The paths that `re.match` at least one pattern, in their original order.

    Args:
        paths: Candidate paths.
        patterns: Regexes; each must match at least one path.
        argument: The name of the argument (config field) the patterns came
            from, named in errors.

    Returns:
        The matching paths.

    Raises:
        ValueError: If a pattern matches no path; the message names
            `argument` and lists the known prefixes so the typo is easy to fix.
    """
    for pattern in patterns:
        if not any(re.match(pattern, path) for path in paths):
            raise ValueError(
                f"`{argument}` pattern {pattern!r} matches no variable. Patterns are "
                "re.match-ed against the start of nested variable paths (sub-model/"
                f"layer/weight; `dry_run` lists them); known prefixes: "
                f"{describe_prefixes(paths, pattern)}. Fix the pattern or drop it."
            )
    return [path for path in paths if any(re.match(p, path) for p in patterns)]


def select(
    paths: Sequence[str],
    include: Sequence[str],
    exclude: Sequence[str],
    include_argument: str,
    exclude_argument: str,
) -> list[str]:
    """`include` (all paths when empty) minus `exclude`, both strictly matched.

    Args:
        paths: Candidate paths.
        include: Regexes of the paths to keep; empty keeps every path.
        exclude: Regexes of the paths to drop (wins over `include`).
        include_argument: The argument `include` came from, named in errors.
        exclude_argument: The argument `exclude` came from, named in errors.

    Returns:
        The selected paths, in their original order.

    Raises:
        ValueError: If a pattern of either list matches no path.
    """
    chosen = set(matching(paths, include, include_argument)) if include else set(paths)
    dropped = set(matching(paths, exclude, exclude_argument))
    return [path for path in paths if path in chosen and path not in dropped]

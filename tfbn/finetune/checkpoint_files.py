"""The checkpoint files of a run directory: which checkpoint it holds, and whether it is intact.

Which checkpoint a `model_dir` holds is decided from its files
(`find_checkpoints`), not only from TensorFlow's `checkpoint` state file: a
lost or garbled state file does not hide intact `ckpt-N` files, and a
checkpoint whose files are missing, empty or truncated is named as
unreadable instead of failing deep inside TensorFlow. An unreadable
checkpoint is set aside, never deleted (`set_aside`), and the state file is
rewritten to list what was found (`write_state_file`).

What a checkpoint holds is `tfbn.finetune.checkpoint`'s concern; this
module only looks at files.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence

import tensorflow as tf
from absl import logging

# The prefix `tf.train.CheckpointManager` numbers its checkpoints with.
CHECKPOINT_NAME = "ckpt"
_NUMBERED_FILE = re.compile(rf"^{CHECKPOINT_NAME}-(\d+)\.(index|data-\d+-of-\d+)$")
# What a reader raises on missing, empty or truncated files.
READ_ERRORS = (tf.errors.OpError, IndexError, ValueError, OSError)


def files_of(prefix: str) -> list[str]:
    """The files of checkpoint `prefix` that exist: its index and data shards.

    Args:
        prefix: A checkpoint prefix (`<dir>/ckpt-10`).

    Returns:
        The file paths, sorted.
    """
    directory, base = os.path.split(prefix)
    directory = directory or "."
    if not tf.io.gfile.isdir(directory):
        return []
    return sorted(
        os.path.join(directory, name)
        for name in tf.io.gfile.listdir(directory)
        if name == base + ".index" or name.startswith(base + ".data-")
    )


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (at most 200 characters), for one-line reports.

    Args:
        error: A raised exception.

    Returns:
        The line, or the exception's type name when it has no message.
    """
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    return text.strip().splitlines()[0][:200]


def _describe_files(paths: Sequence[str]) -> str:
    sizes = []
    for path in paths:
        try:
            sizes.append(f"{path} ({tf.io.gfile.stat(path).length} bytes)")
        except tf.errors.OpError:
            sizes.append(path)
    return ", ".join(sizes)


def checkpoint_problem(prefix: str, read_values: bool = True) -> str | None:
    """Why checkpoint `prefix` cannot be read, naming the file; None when it can.

    Args:
        prefix: A checkpoint prefix.
        read_values: Also read every value (which checks each one's CRC), so
            that a truncated, emptied or corrupted data file is found before
            anything is restored from it.

    Returns:
        The problem, or None.
    """
    index = prefix + ".index"
    files = files_of(prefix)
    data_files = [path for path in files if path != index]
    if index not in files:
        found = f" (found: {_describe_files(data_files)})" if data_files else ""
        return f"its index file {index} is missing{found}"
    try:
        reader = tf.train.load_checkpoint(prefix)
    except READ_ERRORS as error:
        return f"its index file {_describe_files([index])} is unreadable: {first_line(error)}"
    shard_counts = {int(path.rsplit("-of-", 1)[1]) for path in data_files}
    expected = [
        f"{prefix}.data-{shard:05d}-of-{count:05d}"
        for count in (shard_counts or {1})
        for shard in range(count)
    ]
    missing = [path for path in expected if path not in data_files]
    if missing:
        return f"its data file {', '.join(missing)} is missing"
    if read_values:
        try:
            for key in reader.get_variable_to_shape_map():
                reader.get_tensor(key)
        except READ_ERRORS as error:
            return (
                f"its data file {_describe_files(data_files)} is unreadable (truncated, "
                f"emptied or corrupted): {first_line(error)}"
            )
    return None


@dataclasses.dataclass(frozen=True)
class CheckpointSearch:
    """The checkpoints of a directory, as its files show them.

    Attributes:
        directory: The directory searched.
        latest: The newest readable `ckpt-N` prefix, or None.
        older: The `ckpt-N` prefixes older than `latest` that have an index
            file (not read), oldest first.
        unreadable: `{prefix: problem}` of the checkpoints newer than
            `latest` (all of them when `latest` is None), newest first.
        state_problem: Why TensorFlow's `checkpoint` state file does not
            name `latest` (missing, unparsable, or naming another
            checkpoint), or None when it does.
    """

    directory: str
    latest: str | None
    older: list[str]
    unreadable: dict[str, str]
    state_problem: str | None

    def describe_unreadable(self) -> str:
        """Each unreadable checkpoint and its problem, joined by `; `.

        Returns:
            The text.
        """
        return "; ".join(f"{prefix}: {problem}" for prefix, problem in self.unreadable.items())


def find_checkpoints(directory: str) -> CheckpointSearch:
    """Finds the newest readable `ckpt-N` checkpoint of `directory` from its files.

    TensorFlow's `checkpoint` state file is only compared with what the
    files show: a missing or garbled state file hides no checkpoint, and a
    checkpoint newer than the one the state names (written just before a
    crash) is found too.

    Args:
        directory: A run directory.

    Returns:
        The `CheckpointSearch`.
    """
    numbers = set()
    if tf.io.gfile.isdir(directory):
        for name in tf.io.gfile.listdir(directory):
            match = _NUMBERED_FILE.match(name)
            if match:
                numbers.add(int(match[1]))
    prefixes = [
        os.path.join(directory, f"{CHECKPOINT_NAME}-{number}")
        for number in sorted(numbers, reverse=True)
    ]
    latest, unreadable = None, {}
    for prefix in prefixes:
        problem = checkpoint_problem(prefix)
        if problem is None:
            latest = prefix
            break
        unreadable[prefix] = problem
    older = [] if latest is None else prefixes[prefixes.index(latest) + 1 :]
    older = [prefix for prefix in reversed(older) if tf.io.gfile.exists(prefix + ".index")]
    return CheckpointSearch(
        directory=directory,
        latest=latest,
        older=older,
        unreadable=unreadable,
        state_problem=_state_problem(directory, latest) if prefixes else None,
    )


def _state_problem(directory: str, latest: str | None) -> str | None:
    state_file = os.path.join(directory, "checkpoint")
    if not tf.io.gfile.exists(state_file):
        return f"the state file {state_file} is missing"
    state = tf.train.get_checkpoint_state(directory)
    if state is None or not state.model_checkpoint_path:
        return f"the state file {state_file} is unparsable"
    named = state.model_checkpoint_path
    if not os.path.isabs(named):
        named = os.path.join(directory, named)
    if latest is None or os.path.basename(named) == os.path.basename(latest):
        return None
    return f"the state file {state_file} names {named}"


def resolve_checkpoint_path(path: str, argument: str | None = "init_checkpoint") -> str:
    """A checkpoint prefix from a model_dir (its newest readable checkpoint) or a prefix.

    A directory's checkpoints are found from its files (`find_checkpoints`);
    when its newest checkpoint is unreadable, the previous one is used with
    a warning that names both.

    Args:
        path: A directory holding checkpoints, or a checkpoint prefix.
        argument: The argument `path` came from, named in errors; None
            when it is no argument (the run's own `model_dir`).

    Returns:
        The checkpoint prefix.

    Raises:
        ValueError: If `path` holds no readable checkpoint, or is a prefix
            whose index file is missing.
    """
    what = f"`{argument}` {path!r}" if argument else f"Checkpoint {path!r}"
    if tf.io.gfile.isdir(path):
        search = find_checkpoints(path)
        if search.latest is None:
            if search.unreadable:
                raise ValueError(
                    f"{what} holds no readable checkpoint: {search.describe_unreadable()}. "
                    "Pass another checkpoint, or restore the files from a backup."
                )
            # TensorFlow's own lookup, for checkpoints not named `ckpt-N`.
            latest = tf.train.latest_checkpoint(path)
            if latest is None:
                raise ValueError(
                    f"{what} is a directory without a checkpoint; pass a model_dir of a "
                    "finished run or a checkpoint prefix."
                )
            return latest
        if search.unreadable:
            logging.warning(
                "%s: the newest checkpoint is unreadable (%s); using the previous one, %s.",
                path,
                search.describe_unreadable(),
                search.latest,
            )
        elif search.state_problem:
            logging.warning(
                "%s: %s; using the newest readable checkpoint found in its files, %s.",
                path,
                search.state_problem,
                search.latest,
            )
        return search.latest
    if not tf.io.gfile.exists(path + ".index"):
        data_files = files_of(path)
        if data_files:
            raise ValueError(
                f"{what}: the checkpoint's index file {path}.index is missing (found "
                f"{_describe_files(data_files)}), so it cannot be read. Restore the index "
                "from a backup or pass another checkpoint."
            )
        raise ValueError(
            f"{what} is neither a directory nor a checkpoint prefix ({path}.index does not exist)."
        )
    return path


def set_aside(prefix: str, directory: str) -> list[str]:
    """Moves the files of checkpoint `prefix` into `directory` (nothing is deleted).

    An unreadable checkpoint of a lost trajectory is set aside so that the
    resumed run, which numbers its checkpoints by step, cannot overwrite it.

    Args:
        prefix: The checkpoint prefix.
        directory: Where the files go (created if needed); a file already
            there under the same name is kept and the new one gets a suffix.

    Returns:
        The new paths of the files.
    """
    tf.io.gfile.makedirs(directory)
    moved = []
    for path in files_of(prefix):
        target = os.path.join(directory, os.path.basename(path))
        suffix = 1
        while tf.io.gfile.exists(target):
            target = os.path.join(directory, f"{os.path.basename(path)}.{suffix}")
            suffix += 1
        tf.io.gfile.rename(path, target)
        moved.append(target)
    return moved


def write_state_file(search: CheckpointSearch) -> None:
    """Rewrites TensorFlow's `checkpoint` state file to list the checkpoints found.

    Run after `find_checkpoints` found a checkpoint the state file does not
    name, before a `tf.train.CheckpointManager` is created over the
    directory: the manager then counts those checkpoints in `max_to_keep`
    and saves after them, instead of starting over from an empty list.

    Args:
        search: The search whose `latest` (and `older`) checkpoints to list.
    """
    if search.latest is None:
        return
    paths = [*search.older, search.latest]
    timestamps = []
    for path in paths:
        try:
            timestamps.append(os.path.getmtime(path + ".index"))
        except OSError:
            timestamps.append(0.0)
    # The TF1 function is the public way to write this file; its deprecation
    # notice (use CheckpointManager, which cannot adopt existing files) would
    # only confuse the user reading the resume warning just above it.
    tf_logger = tf.get_logger()
    level = tf_logger.level
    tf_logger.setLevel("ERROR")
    try:
        tf.compat.v1.train.update_checkpoint_state(
            search.directory,
            search.latest,
            all_model_checkpoint_paths=paths,
            all_model_checkpoint_timestamps=timestamps,
        )
    finally:
        tf_logger.setLevel(level)

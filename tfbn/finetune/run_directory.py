"""The run directory's own bookkeeping: its lock, the saved configuration, flag changes.

* `lock_run_directory`: an exclusive `fcntl.flock` on `<model_dir>/train.lock`
  for the whole run. The kernel drops the lock when the process ends, even
  by SIGKILL, so a killed run never leaves the directory stuck; the file
  itself stays and tells who holds (or last held) it.
* `RUN_CONFIG_FILE` (`run_config.json`): the configuration the run was
  started with (`original`), the one it runs with now (`current`) and every
  accepted change (`history`). `flags.txt` is the same record as a flagfile.
* `changed_flags`: which settings that shape the trajectory differ between
  the saved record and a resume (`NON_TRAJECTORY_FIELDS` lists those that
  may change).
* `write_text_atomically`: a file is either the old or the new version,
  never half of each, whatever kills the process.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import tempfile

from tfbn.finetune.config import TrainConfig

LOCK_FILE = "train.lock"
RUN_CONFIG_FILE = "run_config.json"
FLAGS_FILE = "flags.txt"

# Settings a resume may change: they decide how long the run goes, what it
# logs and where it writes, not the values of its steps. `init_checkpoint`
# and the restore patterns only matter to a run's first start (a resume
# restores its own checkpoint instead), and `data_dir` only says where the
# same dataset lives. Every other field is compared.
NON_TRAJECTORY_FIELDS = frozenset(
    {
        "model_dir",
        "data_dir",
        "eval_split",
        "train_steps",
        "init_checkpoint",
        "restore_part",
        "restore_exclude",
        "checkpoint_interval",
        "max_to_keep",
        "eval_interval",
        "eval_batches",
        "summary_interval",
        "max_consecutive_skipped_steps",
        "verbose",
        "dry_run",
        "export_dir",
        "export",
        "allow_changed_flags",
    }
)


class RunDirectoryInUseError(ValueError):
    """Another live process holds the run directory's lock."""


class RunDirectoryLock:
    """An exclusive lock on one run directory; `release` (or process exit) frees it.

    Use `lock_run_directory` to take one.

    Attributes:
        path: The lock file.
    """

    def __init__(self, path: str, descriptor: int):
        self.path = path
        self._descriptor = descriptor

    def release(self) -> None:
        """Frees the lock (the file stays: deleting it would race with a new holder)."""
        if self._descriptor is not None:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> RunDirectoryLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def lock_run_directory(model_dir: str) -> RunDirectoryLock:
    """Takes the exclusive lock of `model_dir`, creating the directory if needed.

    The holder (pid, host, start time) is written into the lock file so a
    refused run can say who holds it.

    Args:
        model_dir: A local (or locally mounted) run directory.

    Returns:
        The held `RunDirectoryLock`.

    Raises:
        RunDirectoryInUseError: If another process holds the lock.
        ValueError: If `model_dir` is a remote URL, where `flock` is not
            available.
    """
    if "://" in model_dir:
        raise ValueError(
            f"`model_dir` {model_dir!r} is a remote URL; the run directory lock needs a "
            "local or mounted filesystem (mount the bucket, e.g. with gcsfuse)."
        )
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, LOCK_FILE)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _read_holder(descriptor)
        os.close(descriptor)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise RunDirectoryInUseError(
            f"`model_dir` {model_dir} is in use by another training run ({holder}; lock "
            f"file {path}). Wait for that run to end, stop it, or pass another `model_dir`."
        ) from None
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(descriptor)
    return RunDirectoryLock(path, descriptor)


def _read_holder(descriptor: int) -> str:
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0).decode())
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def write_text_atomically(path: str, text: str) -> None:
    """Replaces `path` by `text` so that a crash leaves the old or the new file, never half.

    Args:
        path: The file to write.
        text: Its new contents.
    """
    directory = os.path.dirname(path) or "."
    descriptor, temporary = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def config_record(config: TrainConfig) -> dict:
    """The config as JSON-ready values (tuples become lists).

    Args:
        config: The configuration.

    Returns:
        `{field: value}` for every field.
    """
    return {
        field.name: _jsonable(getattr(config, field.name)) for field in dataclasses.fields(config)
    }


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def read_run_record(model_dir: str) -> dict | None:
    """Reads `run_config.json` of `model_dir`.

    Args:
        model_dir: The run directory.

    Returns:
        The record (`original`, `current`, `history`), or None when there is none.

    Raises:
        ValueError: If the file exists but is not a record this module wrote.
    """
    path = os.path.join(model_dir, RUN_CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as stream:
            record = json.load(stream)
        if not isinstance(record.get("current"), dict):
            raise ValueError("no `current` configuration")
    except (ValueError, AttributeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is unreadable ({error}); it records the flags this run was started "
            "with. Restore it from a backup, or delete it to resume without the check of "
            f"changed flags (flags.txt in the same `model_dir` holds the same flags)."
        ) from None
    return record


def changed_flags(saved: dict, config: TrainConfig) -> dict[str, tuple]:
    """The trajectory settings of `config` that differ from a saved record.

    A field the record lacks (written by an older version) counts as its
    default value.

    Args:
        saved: `{field: value}` as `config_record` wrote it.
        config: The configuration of the resume.

    Returns:
        `{field: (saved_value, new_value)}`, in field order.
    """
    changes = {}
    for field in dataclasses.fields(config):
        if field.name in NON_TRAJECTORY_FIELDS:
            continue
        new = _jsonable(getattr(config, field.name))
        old = saved.get(field.name, _jsonable(field.default))
        if old != new:
            changes[field.name] = (old, new)
    return changes


def describe_changes(changes: dict[str, tuple]) -> str:
    """`--name: saved X, new Y` for each change, joined by `; `.

    Args:
        changes: What `changed_flags` returned.

    Returns:
        The text.
    """
    return "; ".join(
        f"--{name}: saved {old!r}, new {new!r}" for name, (old, new) in changes.items()
    )


def check_resume_flags(model_dir: str, config: TrainConfig, checkpoint: str) -> dict:
    """Refuses a resume whose trajectory settings differ from the saved record.

    Args:
        model_dir: The run directory.
        config: The configuration of the resume.
        checkpoint: The checkpoint being resumed (named in the message).

    Returns:
        The changes accepted because `config.allow_changed_flags` is set
        (`{field: (saved, new)}`); empty when nothing changed or there is
        no saved record.

    Raises:
        ValueError: If settings changed and `allow_changed_flags` is not set.
    """
    record = read_run_record(model_dir)
    if record is None:
        return {}
    changes = changed_flags(record["current"], config)
    if changes and not config.allow_changed_flags:
        raise ValueError(
            f"The checkpoint {checkpoint} in `model_dir` does not match this run: it was "
            f"written with other flags ({describe_changes(changes)}). Resume with the saved "
            f"flags (`--flagfile={os.path.join(model_dir, FLAGS_FILE)}`, raising "
            "`train_steps` is fine), start a new `model_dir` (pass this one as "
            "`init_checkpoint`), or pass `allow_changed_flags` to continue this run with "
            "the new values (the change is recorded in flags.txt and run_config.json)."
        )
    return changes


def record_start(
    model_dir: str, config: TrainConfig, resumed_step: int | None, changes: dict[str, tuple]
) -> None:
    """Writes `run_config.json` and `flags.txt` once every check of a start has passed.

    A fresh start writes a new record. A resume keeps the original
    configuration and appends accepted changes to the history; `flags.txt`
    lists them as comments above the current flags.

    Args:
        model_dir: The run directory.
        config: The configuration this start runs with.
        resumed_step: The step resumed, or None for a fresh start.
        changes: The changes accepted on this resume (`check_resume_flags`).
    """
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    # The override is for this start only: resuming from flags.txt later must
    # be checked again.
    config = dataclasses.replace(config, allow_changed_flags=False)
    current = config_record(config)
    record = read_run_record(model_dir) if resumed_step is not None else None
    if record is None:
        record = {"original": current, "history": []}
    record.setdefault("original", record.get("current", current))
    record.setdefault("history", [])
    if changes:
        record["history"].append(
            {
                "time": now,
                "step": resumed_step,
                "changed": {
                    name: {"saved": old, "new": new} for name, (old, new) in changes.items()
                },
            }
        )
    record["current"] = current
    write_text_atomically(
        os.path.join(model_dir, RUN_CONFIG_FILE), json.dumps(record, indent=1) + "\n"
    )
    header = [f"# The flags of this run; {RUN_CONFIG_FILE} holds the original ones too."]
    for entry in record["history"]:
        header.append(
            f"# Changed at step {entry['step']} ({entry['time']}, allow_changed_flags): "
            + describe_changes(
                {name: (item["saved"], item["new"]) for name, item in entry["changed"].items()}
            )
        )
    write_text_atomically(
        os.path.join(model_dir, FLAGS_FILE), "\n".join(header) + "\n" + config.to_flagfile()
    )

"""Partial fine-tuning: the update plan, partial restore, the train step, the trainer.

Modules:

* `config`: `TrainConfig`, the typed, validated configuration of one run
  (its field names are the `train.py` flag names).
* `flags`: the absl flags of `train.py` and `config_from_flags`.
* `patterns`: scope patterns (regexes on variable paths) that must match.
* `update_plan`: `BNMode` and `plan_update`: which variables train, and the
  mode of every BN layer.
* `optimizers`: the optimizer and learning-rate schedule of a config.
* `train_step`: `build_train_step` (the one train step: deferred BN updates,
  finite guard, any strategy), `bn_modes`, the eval step.
* `checkpoint`: the trainer's checkpoint (`make_checkpoint`), its values
  read by variable path, and exact resume.
* `checkpoint_files`: a run directory's checkpoint files: the newest
  readable checkpoint, integrity checks naming the damaged file, setting
  unreadable ones aside, rewriting the state file.
* `partial_restore`: `restore_partial`, the selected variables assigned by
  nested path from a restore source, with a `RestoreReport`.
* `weight_sources`: reading `--init_checkpoint` sources other than the
  trainer's own checkpoints (`.keras`, `.weights.h5`, TF1 `Saver`) by path.
* `run_directory`: the run directory's lock, saved configuration and the
  changed-flags check on resume.
* `keras_fit`: `partial_finetune`, the same plan and BN modes for `model.fit`.
* `skip_limit`: `SkipStreak`, stopping a run whose steps keep being skipped
  as non-finite.
* `trainer`: the `Trainer` object (initialize, train, evaluate,
  write_report, export) and `train(config)`.
* `outputs`: console reporter, logs, BN report and export of the chief;
  silent stand-ins for other workers.
* `report`: the BN report (bit-identical frozen statistics).
* `summaries`: TensorBoard events and metrics.jsonl.
* `distribution`: `tf.distribute` strategies, worker roles, synchronized BN.

Library errors name Python arguments (config fields such as
`restore_exclude`); only `train.py` speaks in flags.
"""

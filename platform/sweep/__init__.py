"""Ray Tune sweeps over search space files (``ioulab sweep``).

    space.py        the space file schema, validation and the trial plan (no Ray, no torch)
    checkpoint_source.py  where evaluations find their checkpoint (path, run folder, mlflow:<run id>)
    storage.py      the sweep folder: a local path or a pyarrow URI (read, atomic write)
    driver.py       plan → Ray Tune experiments (train stage, eval stage) → outcome
    trainable.py    the Tune trainables over the detector's trainer and evaluator
    finalize.py     one MLflow child run per trial with its final status; summary on the parent
    codecheck.py    the ioulab code identity compared between working dir, driver and trials
    command.py      the CLI
"""

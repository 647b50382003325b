"""The one error type for bad input: what a user typed or pointed at is wrong, said in one line.

Every layer raises its own subclass (a budget, a checkpoint, a protocol file, a run folder, ...); the CLI
catches `InputError` once (`harness.cli.main`): one line, exit 2, no traceback. Anything else is a bug
and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input, reported as one line naming what was wrong and what is accepted."""

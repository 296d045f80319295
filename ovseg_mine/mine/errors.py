"""The error every layer of mining raises when a run cannot go on as asked (one line for the command line)."""


class RunError(RuntimeError):
    """A mining run cannot go on as asked: the run folder holds a run with another config or cannot be written,
    the same error keeps failing images, a model cannot be loaded, a lost node stalled the run... The message is
    one line that says what to do (the CLI prints it and exits 2; a rerun resumes where that applies)."""

"""One exception type for bad user input, so the CLI can turn it into one line and exit 2."""


class UserError(Exception):
    """Bad input from the user: the message says what was wrong and how to fix it.

    The CLI prints ``resnet-lab: error: <message>`` and exits with status 2. Raise it
    before anything is written (no MLflow run, no file), so bad input leaves no trace.
    """

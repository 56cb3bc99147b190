"""The one family of errors a user can cause; the CLI maps them to exit code 2."""


class HarnessError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""


class GatesError(HarnessError):
    pass


class CheckpointError(HarnessError):
    pass


class GoldenError(HarnessError):
    pass

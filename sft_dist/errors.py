"""User-facing errors: printed as one clear message, without a traceback."""


class SftDistError(Exception):
    """An error caused by the user's input (config, data, paths); the message says what to do."""


class ConfigError(SftDistError):
    """The config is invalid. Holds every problem found, one per line."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        n = len(self.problems)
        head = "invalid config" if n == 1 else f"invalid config ({n} problems)"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))

    def __reduce__(self):  # pickled (Ray sends a worker's error to the driver): the problems, not the message
        return type(self), (self.problems,)


class DataError(SftDistError):
    """The data cannot be used as configured (file, row or column named in the message)."""


class BadRow(DataError):
    """One row (or line) cannot be used. `kind` names the problem; `data.on_bad_row: skip` counts such rows
    by kind and drops them, where a file-level DataError always stops the run."""

    def __init__(self, message: str, kind: str = "bad row"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keep `kind` when `datasets.map(num_proc=N)` sends the error back from a worker
        return type(self), (str(self), self.kind)

"""Error types: every problem a user can cause is a `QlisError` whose message says what to do."""


class QlisError(Exception):
    """Base class of the errors qlis raises for bad input; the CLI prints them as one line."""


class InputError(QlisError):
    """A model, file or tensor given to qlis cannot be used as it is."""


class ConfigError(QlisError):
    """A policy, strategy or codec was given a name or parameter it does not accept."""


class ArchiveError(QlisError):
    """A `.qlis` archive (or an encoded record in it) is corrupt, truncated or unsupported."""


class ClusterError(QlisError):
    """The ranks of a distributed job (torchrun) could not work together."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of ``err``'s message, at most ``limit`` characters: what a one-line
    error quotes of an exception another library (or the user's code) raised."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else ""

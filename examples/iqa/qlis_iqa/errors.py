"""Errors of the IQA application: user-fixable problems, printed by the CLI as one line."""

from qlis import QlisError


class IQAError(QlisError):
    """A dataset, image folder, model file or option of qlis-iqa cannot be used as given."""


class WeightsNotFoundError(IQAError):
    """Pretrained backbone weights are not available offline; the message says how to get them."""

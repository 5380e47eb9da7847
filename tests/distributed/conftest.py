"""The tiny random checkpoints of every architecture (tests/model/conftest.py), shared here."""
from tests.model.conftest import tiny_checkpoint  # noqa: F401

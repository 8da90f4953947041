"""The accuracy rule lives in electra_triton.accuracy, shared with the GPU evidence command; tests import it here."""

from electra_triton.accuracy import ABSOLUTE_SLACK, accuracy, assert_accurate, max_error

__all__ = ["ABSOLUTE_SLACK", "accuracy", "assert_accurate", "max_error"]

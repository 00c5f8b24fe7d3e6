"""Shared test fixtures.

Helper functions and constants that several test files use live in helper modules next to the tests
(``hf_utils.py``: tiny HF reference checkpoints), never in another test file; this conftest puts
``tests/`` on ``sys.path`` so ``from hf_utils import ...`` works under any pytest import mode.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root (pyproject.toml, configs/, data/, notebooks/)."""
    return TESTS.parent

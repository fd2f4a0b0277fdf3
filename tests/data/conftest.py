"""Fixtures shared by the data tests: the real sample files in ../shared/data."""

import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_DATA = os.path.join(REPO_ROOT, '..', 'shared', 'data')


@pytest.fixture(scope='session')
def shared_data():
  """The folder of real sample files; tests using it skip where the folder is absent."""
  if not os.path.isdir(SHARED_DATA):
    pytest.skip(f'real sample files not found: {os.path.normpath(SHARED_DATA)} is absent (they '
                f'sit in ../shared/data beside the repository; CI has them, a plain clone does '
                f'not)')
  return SHARED_DATA

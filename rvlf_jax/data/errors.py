"""Errors raised by the dataset readers: each names the file (and line, if any) and the problem.

All are ValueErrors, so a caller that only wants "bad data" can catch ValueError. They survive
pickling with their fields intact, which matters because grain worker processes send exceptions
back to the main process by pickling them.
"""

from __future__ import annotations

import os


class DataError(ValueError):
  """A file that a reader could not use.

  Attributes:
    path: the file or folder.
    problem: what is wrong, in words.
    line: 1-based line (or entry) number where the problem is, or None.
  """

  def __init__(self, path: str | os.PathLike, problem: str, line: int | None = None):
    self.path = os.fspath(path)
    self.problem = problem
    self.line = line
    where = self.path if line is None else f'{self.path}:{line}'
    super().__init__(f'{where}: {problem}')

  def __reduce__(self):
    # BaseException pickles as cls(*self.args), i.e. with the formatted message only, which would
    # not fit this __init__; rebuild from the fields instead.
    return type(self), (self.path, self.problem, self.line)


class PoseError(DataError):
  """A pose file (.pose or RTMPose pickle) that is missing, truncated, corrupt or has bad values."""


class AnnotationError(DataError):
  """An annotation file or row that is missing or malformed."""


class VideoError(DataError):
  """A video file or frame folder that is missing, empty or cannot be decoded."""

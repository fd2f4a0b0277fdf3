"""Readers for sign-language translation annotations: PHOENIX-2014T, CSL-Daily, How2Sign, OpenASL.

Each reader returns `(annotations, report)`: a list of `Annotation` records in file order and a
`ReadReport`. In strict mode (the default) a bad row raises `AnnotationError` naming the file and
line; with `strict=False` the row is skipped and counted by reason in the report, so a training run
can print `report` at the end of an epoch. A missing file, or a header without the needed
columns, always raises: there is nothing to skip to.

Bad rows: a wrong number of fields, an empty translation, unparsable or inverted times, text that
is not UTF-8, a repeated id. Blank lines are ignored.

Formats (all UTF-8; a leading byte-order mark is tolerated):
  PHOENIX-2014T  annotations/manual/PHOENIX-2014-T.{train,dev,test}.corpus.csv, '|'-separated,
                 header name|video|start|end|speaker|orth|translation. Frames are PNG folders
                 features/fullFrame-210x260px/<split>/<name>/ (210 wide x 260 high, 25 fps; the
                 'video' column's "<name>/1/*.png" predates that layout, so it is not used).
  CSL-Daily      sentence_label/split_1.txt ('|'-separated, header name|split) and
                 sentence_label/csl2020ct_v2.pkl, a pickle {'info': [{'name', 'length' (frames),
                 'label_gloss', 'label_char', 'label_word', 'label_postag', 'signer', 'time'}, ...],
                 'gloss_map', 'char_map', ...}. The text is ''.join(label_char). Frames are JPEG
                 folders <media_dir>/<name>/. Entries missing from the split file are left out
                 (counted as filtered, not as errors).
  How2Sign       how2sign_realigned_{train,val,test}.csv, tab-separated, header VIDEO_ID,
                 VIDEO_NAME, SENTENCE_ID, SENTENCE_NAME, START_REALIGNED, END_REALIGNED, SENTENCE
                 (seconds). Quoted fields follow the csv convention, as pandas reads them.
  OpenASL        openasl-v1.0.tsv, tab-separated, header vid, yid, start, end, raw-text,
                 tokenized-text, gloss, split; times as HH:MM:SS.fff (ffmpeg style) or seconds.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
import re
from typing import Iterator, Sequence

from rvlf_jax.data.errors import AnnotationError
from rvlf_jax.data.poses import safe_unpickle

PHOENIX_FPS = 25.0
CSL_DAILY_FPS = 30.0


@dataclasses.dataclass(frozen=True)
class Annotation:
  """One sentence-level sample.

  Attributes:
    id: unique within its dataset.
    split: as the source names it ('train', 'dev', 'val', 'valid', 'test', ...).
    text: the spoken-language translation (the training target).
    dataset: 'phoenix2014t', 'csl_daily', 'how2sign' or 'openasl'.
    frames_dir: folder of frame images, for datasets shipped as frames.
    video: video file, for datasets shipped as videos.
    start, end: seconds into `video` of the sentence; None means the whole file.
    fps: frame rate where the dataset fixes it (frame folders), else None (read it from the video).
    num_frames: frame count where the annotation gives it.
    signer: signer id where known.
    glosses: gloss sequence where known.
  """

  id: str
  split: str
  text: str
  dataset: str
  frames_dir: str | None = None
  video: str | None = None
  start: float | None = None
  end: float | None = None
  fps: float | None = None
  num_frames: int | None = None
  signer: str | None = None
  glosses: tuple[str, ...] | None = None


@dataclasses.dataclass
class ReadReport:
  """What a reader kept and skipped.

  Attributes:
    path: the annotation file.
    kept: records returned.
    skipped: reason -> rows skipped for it (lenient mode only; strict mode raises instead).
    filtered: rows left out by design (another split, absent from the split file).
    examples: the first few skipped rows as "path:line: reason".
  """

  path: str
  kept: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  filtered: int = 0
  examples: list[str] = dataclasses.field(default_factory=list)

  MAX_EXAMPLES = 10

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def __str__(self) -> str:
    text = f'{self.path}: kept {self.kept}, skipped {self.num_skipped}'
    if self.skipped:
      text += ' (' + ', '.join(f'{r}: {n}' for r, n in self.skipped.most_common()) + ')'
    if self.filtered:
      text += f', filtered {self.filtered}'
    return text


class _Rows:
  """Validates rows one by one: raises in strict mode, counts in lenient mode."""

  def __init__(self, path: str, strict: bool):
    self.path, self.strict = path, strict
    self.report = ReadReport(path)
    self.ids: set[str] = set()

  def bad(self, line: int, reason: str, detail: str = '') -> None:
    message = reason + (f': {detail}' if detail else '')
    if self.strict:
      raise AnnotationError(self.path, message + ' (pass strict=False to skip such rows)', line)
    self.report.skipped[reason] += 1
    if len(self.report.examples) < ReadReport.MAX_EXAMPLES:
      self.report.examples.append(f'{self.path}:{line}: {message}')

  def add(self, out: list, line: int, annotation: Annotation) -> None:
    if not annotation.text.strip():
      return self.bad(line, 'empty translation', annotation.id)
    if annotation.id in self.ids:
      return self.bad(line, 'repeated id', annotation.id)
    self.ids.add(annotation.id)
    out.append(annotation)
    self.report.kept += 1


def _open_table(path: str, delimiter: str, required: Sequence[str], strict: bool):
  """Yields (line, {column: value}) for each data row, after checking the header."""
  rows = _Rows(path, strict)

  def generate() -> Iterator[tuple[int, dict[str, str]]]:
    try:
      # surrogateescape keeps bad bytes as lone surrogates, so a bad row can be named and skipped
      # instead of the decoder failing somewhere in the middle of the file.
      f = open(path, encoding='utf-8-sig', errors='surrogateescape', newline='')
    except FileNotFoundError:
      raise AnnotationError(path, 'no such file') from None
    except IsADirectoryError:
      raise AnnotationError(path, 'is a folder, not an annotation file') from None
    with f:
      reader = csv.reader(f, delimiter=delimiter)
      header = next(reader, None)
      if not header or header == ['']:
        raise AnnotationError(path, 'file is empty; expected a header line', 1)
      header = [h.strip() for h in header]
      missing = [c for c in required if c not in header]
      if missing:
        raise AnnotationError(path, f'header {header} lacks columns {missing}', 1)
      for fields in reader:
        line = reader.line_num
        if not fields or fields == ['']:
          continue
        if len(fields) != len(header):
          rows.bad(line, 'wrong number of fields', f'{len(fields)} instead of {len(header)}')
          continue
        if not all(_is_utf8(v) for v in fields):
          rows.bad(line, 'not UTF-8')
          continue
        yield line, dict(zip(header, (v.strip() for v in fields)))

  return rows, generate()


def _is_utf8(text: str) -> bool:
  try:
    text.encode('utf-8')
    return True
  except UnicodeEncodeError:
    return False


def _split_from_name(path: str, pattern: str, split: str | None) -> str:
  if split is not None:
    return split
  match = re.fullmatch(pattern, os.path.basename(path))
  if not match:
    raise ValueError(f'cannot tell the split from the file name {path!r}; pass split=.')
  return match.group(1)


def parse_seconds(text: str) -> float:
  """'12.5', '01:02.5' or '00:01:02.5' -> seconds. Raises ValueError on anything else."""
  parts = text.strip().split(':')
  if not 1 <= len(parts) <= 3 or any(not p for p in parts):
    raise ValueError(f'not a time: {text!r}')
  seconds = 0.0
  for part in parts:
    seconds = seconds * 60 + float(part)
  if not seconds >= 0 or seconds == float('inf'):
    raise ValueError(f'not a time: {text!r}')
  return seconds


def _times(rows: _Rows, line: int, start: str, end: str) -> tuple[float, float] | None:
  try:
    begin, finish = parse_seconds(start), parse_seconds(end)
  except ValueError as e:
    rows.bad(line, 'bad time', str(e))
    return None
  if finish <= begin:
    rows.bad(line, 'end not after start', f'{start} .. {end}')
    return None
  return begin, finish


def read_phoenix(csv_path: str | os.PathLike, *, frames_root: str | None = None,
                 split: str | None = None, strict: bool = True):
  """Reads a PHOENIX-2014T corpus file.

  Args:
    csv_path: PHOENIX-2014-T.<split>.corpus.csv.
    frames_root: the fullFrame-210x260px folder; default: the release layout, i.e.
      <csv dir>/../../features/fullFrame-210x260px.
    split: default: taken from the file name.
    strict: raise on bad rows (True) or skip and count them (False).

  Returns:
    (list of Annotation with frames_dir=<frames_root>/<split>/<name>, fps 25, signer, glosses;
    ReadReport).
  """
  path = os.fspath(csv_path)
  split = _split_from_name(path, r'PHOENIX-2014-T\.(\w+)\.corpus\.csv', split)
  if frames_root is None:
    frames_root = os.path.join(os.path.dirname(path), '..', '..', 'features', 'fullFrame-210x260px')
  rows, table = _open_table(path, '|', ('name', 'speaker', 'orth', 'translation'), strict)
  out: list[Annotation] = []
  for line, row in table:
    rows.add(out, line, Annotation(
        id=row['name'], split=split, text=row['translation'], dataset='phoenix2014t',
        frames_dir=os.path.normpath(os.path.join(frames_root, split, row['name'])),
        fps=PHOENIX_FPS, signer=row['speaker'] or None, glosses=tuple(row['orth'].split())))
  return out, rows.report


def read_csl_daily(label_path: str | os.PathLike, split_path: str | os.PathLike, *,
                   frames_root: str | None = None, splits: Sequence[str] | None = None,
                   strict: bool = True):
  """Reads CSL-Daily's label pickle and split file.

  Args:
    label_path: csl2020ct_v2.pkl.
    split_path: split_1.txt ('|'-separated, header name|split).
    frames_root: folder holding one frame folder per sample; default: <label dir>/../sentence/
      frames_512x512 (the layout of the release as we know it; pass it if yours differs).
    splits: keep only these splits (default: all in the split file).
    strict: raise on bad entries (True) or skip and count them (False).

  Returns:
    (list of Annotation in pickle order with frames_dir, fps 30, num_frames, signer, glosses;
    ReadReport for the pickle, whose line numbers are 1-based entry numbers in 'info').
  """
  label_path, split_path = os.fspath(label_path), os.fspath(split_path)
  split_rows, table = _open_table(split_path, '|', ('name', 'split'), strict)
  split_of: dict[str, str] = {}
  for line, row in table:
    if row['name'] in split_of:
      split_rows.bad(line, 'repeated id', row['name'])
      continue
    split_of[row['name']] = row['split']

  if frames_root is None:
    frames_root = os.path.join(os.path.dirname(label_path), '..', 'sentence', 'frames_512x512')
  try:
    with open(label_path, 'rb') as f:
      labels = safe_unpickle(f)
  except FileNotFoundError:
    raise AnnotationError(label_path, 'no such file') from None
  except Exception as e:  # garbage makes pickle raise many types
    raise AnnotationError(label_path, f'cannot unpickle: {type(e).__name__}: {e}') from None
  if not isinstance(labels, dict) or not isinstance(labels.get('info'), (list, tuple)):
    raise AnnotationError(label_path, "expected a dict whose 'info' is a list of samples")

  rows = _Rows(label_path, strict)
  rows.report.skipped.update(split_rows.report.skipped)
  rows.report.examples += split_rows.report.examples
  out: list[Annotation] = []
  for entry_no, entry in enumerate(labels['info'], start=1):
    if not isinstance(entry, dict) or not isinstance(entry.get('name'), str):
      rows.bad(entry_no, 'malformed entry', f"expected a dict with a 'name', got {entry!r:.80}")
      continue
    name = entry['name']
    if name not in split_of or (splits is not None and split_of[name] not in splits):
      rows.report.filtered += 1
      continue
    chars = entry.get('label_char')
    if not isinstance(chars, (list, tuple)) or not all(isinstance(c, str) for c in chars):
      rows.bad(entry_no, 'malformed entry', f"{name}: 'label_char' is not a list of characters")
      continue
    glosses = entry.get('label_gloss')
    length = entry.get('length')
    signer = entry.get('signer')
    rows.add(out, entry_no, Annotation(
        id=name, split=split_of[name], text=''.join(chars).strip(), dataset='csl_daily',
        frames_dir=os.path.normpath(os.path.join(frames_root, name)), fps=CSL_DAILY_FPS,
        num_frames=int(length) if length is not None else None,
        signer=str(signer) if signer is not None else None,
        glosses=tuple(glosses) if isinstance(glosses, (list, tuple)) else None))
  return out, rows.report


def read_how2sign(csv_path: str | os.PathLike, *, video_dir: str | None = None,
                  clips: bool = True, split: str | None = None, strict: bool = True):
  """Reads a How2Sign realigned sentence file.

  Args:
    csv_path: how2sign_realigned_<split>.csv.
    video_dir: where the videos are; default: the csv's folder.
    clips: True: one pre-cut clip per sentence, <video_dir>/<SENTENCE_NAME>.mp4, start/end None.
      False: the full videos <video_dir>/<VIDEO_NAME>.mp4 with the realigned start/end.
    split: default: taken from the file name.
    strict: raise on bad rows (True) or skip and count them (False).

  Returns:
    (list of Annotation keyed by SENTENCE_NAME; ReadReport). Rows with bad times are bad rows
    in both modes of `clips`, as they signal a damaged file.
  """
  path = os.fspath(csv_path)
  split = _split_from_name(path, r'how2sign_realigned_(\w+)\.csv', split)
  video_dir = os.path.dirname(path) if video_dir is None else video_dir
  rows, table = _open_table(path, '\t', ('VIDEO_NAME', 'SENTENCE_NAME', 'START_REALIGNED',
                                         'END_REALIGNED', 'SENTENCE'), strict)
  out: list[Annotation] = []
  for line, row in table:
    times = _times(rows, line, row['START_REALIGNED'], row['END_REALIGNED'])
    if times is None:
      continue
    name = row['SENTENCE_NAME'] if clips else row['VIDEO_NAME']
    rows.add(out, line, Annotation(
        id=row['SENTENCE_NAME'], split=split, text=row['SENTENCE'], dataset='how2sign',
        video=os.path.join(video_dir, name + '.mp4'),
        start=None if clips else times[0], end=None if clips else times[1]))
  return out, rows.report


def read_openasl(tsv_path: str | os.PathLike, *, video_dir: str | None = None, clips: bool = True,
                 splits: Sequence[str] | None = None, text_column: str = 'raw-text',
                 strict: bool = True):
  """Reads OpenASL's openasl-v1.0.tsv.

  Args:
    tsv_path: the tsv.
    video_dir: where the videos are; default: the tsv's folder.
    clips: True: clips cut by OpenASL's prep/crop_video.py, <video_dir>/<vid>.mp4 with ':'
      written as '%' (as that script names them), start/end None. False: the downloaded YouTube
      videos <video_dir>/<yid>.mp4 with start/end.
    splits: keep only these values of the 'split' column (default: all).
    text_column: 'raw-text' or 'tokenized-text'.
    strict: raise on bad rows (True) or skip and count them (False).

  Returns:
    (list of Annotation keyed by vid, glosses where the gloss column is filled; ReadReport).
  """
  path = os.fspath(tsv_path)
  video_dir = os.path.dirname(path) if video_dir is None else video_dir
  rows, table = _open_table(path, '\t', ('vid', 'yid', 'start', 'end', text_column, 'gloss',
                                         'split'), strict)
  out: list[Annotation] = []
  for line, row in table:
    if splits is not None and row['split'] not in splits:
      rows.report.filtered += 1
      continue
    times = _times(rows, line, row['start'], row['end'])
    if times is None:
      continue
    file = row['vid'].replace(':', '%') if clips else row['yid']
    rows.add(out, line, Annotation(
        id=row['vid'], split=row['split'], text=row[text_column], dataset='openasl',
        video=os.path.join(video_dir, file + '.mp4'),
        start=None if clips else times[0], end=None if clips else times[1],
        glosses=tuple(row['gloss'].split()) or None))
  return out, rows.report

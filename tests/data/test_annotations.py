"""Annotation readers on small files written in each dataset's exact format, good and bad."""

import os
import pickle

import pytest

from rvlf_jax.data.annotations import (Annotation, parse_seconds, read_csl_daily, read_how2sign,
                                       read_openasl, read_phoenix)
from rvlf_jax.data.errors import AnnotationError

PHOENIX_HEADER = 'name|video|start|end|speaker|orth|translation'
PHOENIX_ROWS = [
    '11August_2010_Wednesday_tagesschau-2|11August_2010_Wednesday_tagesschau-2/1/*.png|-1|-1|'
    'Signer08|DRUCK TIEF KOMMEN|tiefer luftdruck bestimmt in den nächsten tagen unser wetter',
    '11August_2010_Wednesday_tagesschau-3|11August_2010_Wednesday_tagesschau-3/1/*.png|-1|-1|'
    'Signer08|ES-BEDEUTET VIEL WOLKE UND KOENNEN REGEN GEWITTER KOENNEN|das bedeutet viele '
    'wolken und immer wieder zum teil kräftige schauer und gewitter',
    '25October_2010_Monday_tagesschau-17|25October_2010_Monday_tagesschau-17/1/*.png|-1|-1|'
    'Signer01|SUED UEBERWIEGEND SONNE|im süden überwiegend freundlich und größtenteils sonnig',
]


def write_text(path, lines, encoding='utf-8'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding=encoding, newline='') as f:
    f.write('\n'.join(lines) + '\n')
  return str(path)


def phoenix_file(tmp_path, rows, split='train'):
  manual = tmp_path / 'PHOENIX-2014-T' / 'annotations' / 'manual'
  path = manual / f'PHOENIX-2014-T.{split}.corpus.csv'
  return write_text(path, [PHOENIX_HEADER] + rows)


# --- PHOENIX-2014T.


def test_phoenix(tmp_path):
  path = phoenix_file(tmp_path, PHOENIX_ROWS, split='dev')
  records, report = read_phoenix(path)
  assert [r.id for r in records] == [row.split('|')[0] for row in PHOENIX_ROWS]
  first = records[0]
  assert first == Annotation(
      id='11August_2010_Wednesday_tagesschau-2', split='dev',
      text='tiefer luftdruck bestimmt in den nächsten tagen unser wetter', dataset='phoenix2014t',
      frames_dir=str(tmp_path / 'PHOENIX-2014-T' / 'features' / 'fullFrame-210x260px' / 'dev'
                     / '11August_2010_Wednesday_tagesschau-2'),
      fps=25.0, signer='Signer08', glosses=('DRUCK', 'TIEF', 'KOMMEN'))
  assert records[2].text == 'im süden überwiegend freundlich und größtenteils sonnig'
  assert (report.kept, report.num_skipped, report.filtered) == (3, 0, 0)
  records, _ = read_phoenix(path, frames_root='/data/frames', split='test')
  assert records[1].frames_dir == '/data/frames/test/11August_2010_Wednesday_tagesschau-3'


def test_phoenix_bad_rows_strict_and_lenient(tmp_path):
  rows = [PHOENIX_ROWS[0],
          'broken-1|x|-1|-1|Signer01|A B|some|extra|fields',
          'empty-2|empty-2/1/*.png|-1|-1|Signer02|A B|   ',
          PHOENIX_ROWS[1],
          PHOENIX_ROWS[0]]  # a repeated id
  path = phoenix_file(tmp_path, rows)
  with pytest.raises(AnnotationError) as info:
    read_phoenix(path)
  assert info.value.line == 3 and info.value.path == path
  assert str(info.value).startswith(f'{path}:3: wrong number of fields: 9 instead of 7')
  records, report = read_phoenix(path, strict=False)
  assert [r.id for r in records] == [PHOENIX_ROWS[0].split('|')[0], PHOENIX_ROWS[1].split('|')[0]]
  assert report.kept == 2 and report.num_skipped == 3
  assert dict(report.skipped) == {
      'wrong number of fields': 1, 'empty translation': 1, 'repeated id': 1}
  assert report.examples[1] == f'{path}:4: empty translation: empty-2'
  text = str(report)
  assert 'kept 2, skipped 3' in text and 'empty translation: 1' in text


def test_phoenix_empty_translation_is_named(tmp_path):
  path = phoenix_file(tmp_path, ['a-1|a-1/1/*.png|-1|-1|Signer01|A|'])
  with pytest.raises(AnnotationError, match=r':2: empty translation: a-1'):
    read_phoenix(path)


def test_phoenix_not_utf8(tmp_path):
  path = phoenix_file(tmp_path, PHOENIX_ROWS[:1])
  with open(path, 'ab') as f:
    f.write('b-1|b-1/1/*.png|-1|-1|Signer01|A|schöne grüße\n'.encode('latin-1'))
  with pytest.raises(AnnotationError, match=r':3: not UTF-8'):
    read_phoenix(path)
  records, report = read_phoenix(path, strict=False)
  assert len(records) == 1 and report.skipped == {'not UTF-8': 1}


def test_missing_files_and_bad_headers(tmp_path):
  missing = str(tmp_path / 'PHOENIX-2014-T.train.corpus.csv')
  for strict in (True, False):
    with pytest.raises(AnnotationError, match='no such file'):
      read_phoenix(missing, strict=strict)
  path = write_text(tmp_path / 'PHOENIX-2014-T.train.corpus.csv',
                    ['name|video|speaker|orth', 'a|b|c|d'])
  with pytest.raises(AnnotationError, match=r":1: header .* lacks columns \['translation'\]"):
    read_phoenix(path, strict=False)
  empty = write_text(tmp_path / 'how2sign_realigned_val.csv', [])
  with pytest.raises(AnnotationError, match='expected a header line'):
    read_how2sign(empty)
  with pytest.raises(ValueError, match='cannot tell the split'):
    read_phoenix(write_text(tmp_path / 'corpus.csv', [PHOENIX_HEADER]))


# --- CSL-Daily.


def csl_files(tmp_path, info, split_lines):
  labels = tmp_path / 'CSL-Daily' / 'sentence_label' / 'csl2020ct_v2.pkl'
  os.makedirs(labels.parent, exist_ok=True)
  with open(labels, 'wb') as f:
    pickle.dump({'info': info, 'gloss_map': ['他', '谁'], 'char_map': []}, f)
  split = write_text(labels.parent / 'split_1.txt', ['name|split'] + split_lines)
  return str(labels), split


def csl_entry(name, chars, signer=3):
  return {'name': name, 'length': 55, 'label_gloss': ['他', '谁'], 'label_char': list(chars),
          'label_word': ['他', '是', '谁', '？'], 'label_postag': ['r', 'v', 'r', 'w'],
          'signer': signer, 'time': 0}


def test_csl_daily(tmp_path):
  info = [csl_entry('S000007_P0003_T00', '他是谁？'),
          csl_entry('S000008_P0000_T00', '今天天气很好。', 0),
          csl_entry('S000009_P0001_T00', '我想喝水。', 1)]
  labels, split = csl_files(tmp_path, info, ['S000007_P0003_T00|train', 'S000008_P0000_T00|test'])
  records, report = read_csl_daily(labels, split)
  assert [r.id for r in records] == ['S000007_P0003_T00', 'S000008_P0000_T00']
  first = records[0]
  assert first.text == '他是谁？' and first.split == 'train' and first.dataset == 'csl_daily'
  assert first.glosses == ('他', '谁') and first.signer == '3' and first.num_frames == 55
  assert first.fps == 30.0
  frames = tmp_path / 'CSL-Daily' / 'sentence' / 'frames_512x512'
  assert first.frames_dir == str(frames / 'S000007_P0003_T00')
  assert records[1].text == '今天天气很好。' and records[1].signer == '0'
  # S000009 is not in the split file: left out, but not an error.
  assert report.kept == 2 and report.filtered == 1 and report.num_skipped == 0
  records, report = read_csl_daily(labels, split, splits=['test'], frames_root='/f')
  assert [r.id for r in records] == ['S000008_P0000_T00'] and report.filtered == 2
  assert records[0].frames_dir == '/f/S000008_P0000_T00'


def test_csl_daily_bad_entries(tmp_path):
  info = [csl_entry('S1', '好'), csl_entry('S2', ''), 'not a dict',
          {**csl_entry('S3', 'x'), 'label_char': 5}]
  labels, split = csl_files(tmp_path, info,
                            ['S1|train', 'S2|train', 'S3|dev', 'S1|dev', 'S4|train|extra'])
  with pytest.raises(AnnotationError, match=r'split_1.txt:5: repeated id: S1'):
    read_csl_daily(labels, split)
  records, report = read_csl_daily(labels, split, strict=False)
  assert [r.id for r in records] == ['S1']
  assert dict(report.skipped) == {'repeated id': 1, 'wrong number of fields': 1,
                                  'empty translation': 1, 'malformed entry': 2}
  labels_only, good_split = csl_files(tmp_path / 'b', info[:2], ['S1|train', 'S2|train'])
  with pytest.raises(AnnotationError, match=r'csl2020ct_v2.pkl:2: empty translation: S2'):
    read_csl_daily(labels_only, good_split)


def test_csl_daily_bad_pickles(tmp_path):
  labels, split = csl_files(tmp_path, [], [])
  with open(labels, 'wb') as f:
    pickle.dump({'samples': []}, f)
  with pytest.raises(AnnotationError, match="'info' is a list"):
    read_csl_daily(labels, split)
  with open(labels, 'wb') as f:
    f.write(b'garbage')
  with pytest.raises(AnnotationError, match='cannot unpickle'):
    read_csl_daily(labels, split)
  with pytest.raises(AnnotationError, match='no such file'):
    read_csl_daily(str(tmp_path / 'none.pkl'), split)


# --- How2Sign.

H2S_HEADER = '\t'.join(['VIDEO_ID', 'VIDEO_NAME', 'SENTENCE_ID', 'SENTENCE_NAME', 'START_REALIGNED',
                        'END_REALIGNED', 'SENTENCE'])


def test_how2sign(tmp_path):
  video = '--7E2sU6zP4\t--7E2sU6zP4-5-rgb_front\t'
  rows = [video + '--7E2sU6zP4_10\t--7E2sU6zP4_10-5-rgb_front\t129.06\t142.48\t'
          'And I call them decorative elements because they are simply decorative.',
          video + '--7E2sU6zP4_11\t--7E2sU6zP4_11-5-rgb_front\t142.5\t150.0\t'
          '"So," she said, "the café is closed."']
  path = write_text(tmp_path / 'how2sign_realigned_val.csv', [H2S_HEADER] + rows)
  records, report = read_how2sign(path, video_dir='/v')
  assert report.kept == 2
  assert records[0] == Annotation(
      id='--7E2sU6zP4_10-5-rgb_front', split='val', dataset='how2sign',
      text='And I call them decorative elements because they are simply decorative.',
      video='/v/--7E2sU6zP4_10-5-rgb_front.mp4')
  # csv quoting, as pandas reads it: the leading quote pair delimits, later quotes stay.
  assert records[1].text == 'So, she said, "the café is closed."'
  records, _ = read_how2sign(path, clips=False)
  assert records[1].video == str(tmp_path / '--7E2sU6zP4-5-rgb_front.mp4')
  assert (records[1].start, records[1].end) == (142.5, 150.0)


def test_how2sign_bad_times(tmp_path):
  rows = ['a\ta-v\ta_1\ta_1-s\t1.0\tabc\tHello.', 'a\ta-v\ta_2\ta_2-s\t5.0\t4.0\tBye.',
          'a\ta-v\ta_3\ta_3-s\t5.0\t6.0\t']
  path = write_text(tmp_path / 'how2sign_realigned_train.csv', [H2S_HEADER] + rows)
  with pytest.raises(AnnotationError, match=r':2: bad time'):
    read_how2sign(path)
  records, report = read_how2sign(path, strict=False)
  assert records == [] and dict(report.skipped) == {
      'bad time': 1, 'end not after start': 1, 'empty translation': 1}


# --- OpenASL.

OPENASL_HEADER = 'vid\tyid\tstart\tend\traw-text\ttokenized-text\tgloss\tsplit'


def test_openasl(tmp_path):
  rows = ['I6h2uqJnw7A-00:00:10.599-00:00:12.080\tI6h2uqJnw7A\t00:00:10.599\t00:00:12.080\t'
          'Hello, everyone!\thello , everyone !\t\ttrain',
          'Fna4TLb-O3c-00:07:45.365-00:07:51.870\tFna4TLb-O3c\t00:07:45.365\t00:07:51.870\t'
          "It's a nice day.\tit 's a nice day .\tNICE DAY\ttest"]
  path = write_text(tmp_path / 'openasl-v1.0.tsv', [OPENASL_HEADER] + rows)
  records, report = read_openasl(path, video_dir='/clips')
  assert report.kept == 2
  assert records[0].video == '/clips/I6h2uqJnw7A-00%00%10.599-00%00%12.080.mp4'
  assert records[0].glosses is None and records[0].start is None
  assert records[0].text == 'Hello, everyone!'
  assert records[1].glosses == ('NICE', 'DAY') and records[1].split == 'test'
  records, report = read_openasl(path, video_dir='/raw', clips=False, splits=['test'],
                                 text_column='tokenized-text')
  assert len(records) == 1 and report.filtered == 1
  assert records[0].video == '/raw/Fna4TLb-O3c.mp4'
  assert records[0].start == pytest.approx(465.365) and records[0].end == pytest.approx(471.87)
  assert records[0].text == "it 's a nice day ."


def test_openasl_wrong_field_count(tmp_path):
  path = write_text(tmp_path / 'openasl-v1.0.tsv',
                    [OPENASL_HEADER, 'a\tb\t0\t1\ttext\ttext\ttrain'])
  with pytest.raises(AnnotationError, match=r':2: wrong number of fields: 7 instead of 8'):
    read_openasl(path)
  assert read_openasl(path, strict=False)[1].skipped == {'wrong number of fields': 1}


def test_parse_seconds():
  assert parse_seconds('12.5') == 12.5
  assert parse_seconds('01:02.5') == 62.5
  assert parse_seconds('1:00:01.25') == 3601.25
  for bad in ('', 'abc', '1::2', '-3', '1:2:3:4', 'inf', 'nan'):
    with pytest.raises(ValueError):
      parse_seconds(bad)


def test_blank_lines_and_bom_are_tolerated(tmp_path):
  path = tmp_path / 'annotations' / 'manual' / 'PHOENIX-2014-T.test.corpus.csv'
  write_text(path, [PHOENIX_HEADER, PHOENIX_ROWS[0], '', PHOENIX_ROWS[1], ''], encoding='utf-8-sig')
  records, report = read_phoenix(str(path))
  assert len(records) == 2 and report.num_skipped == 0

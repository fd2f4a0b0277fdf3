"""Preparing SynthSign (generate, cache, describe) and describing it for people.

`prepare` is what `python -m launch.synthsign` runs. `describe` prints the lexicon size, sentence
length histograms, OOV rates of dev/test against train, durations, signers and pose-estimator
statistics, writes them to describe.json, and writes a sample clip as a GIF (left: the RGB frames;
right: the simulated skeleton over darkened frames) with its glosses and translations in a text
sidecar and in the GIF's comment.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import Any

import numpy as np

from rvlf_jax.data.synthsign import grammar, lexicon, phonology, signers
from rvlf_jax.data.synthsign import pose as pose_lib
from rvlf_jax.data.synthsign.dataset import SPLITS, SynthSign

# Skeleton overlay: bones as (a, b) keypoint pairs, and colours per group.
_BODY_BONES = [(5, 6), (5, 7), (7, 9), (6, 8), (8, 10), (5, 11), (6, 12), (11, 12), (0, 1), (0, 2)]
_HAND_BONES = [(0, 1), (1, 2), (2, 3), (3, 4)] + [(b + j - 1, b + j) if j else (0, b)
                                                   for b in (5, 9, 13, 17) for j in range(4)]
_COLORS = {'body': (255, 255, 255), 'face': (255, 230, 60), 'left': (60, 220, 255),
           'right': (255, 140, 40)}


def _bones():
  out = [(a, b, 'body') for a, b in _BODY_BONES]
  for base, name in ((91, 'left'), (112, 'right')):
    out += [(base + a, base + b, name) for a, b in _HAND_BONES]
  return out


def draw_skeleton(image: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, scale: float,
                  min_score: float = 0.2) -> np.ndarray:
  """Draws detected keypoints (score > min_score) and their bones on a copy of an RGB image.

  Args:
    image: uint8[H, W, 3]; keypoints: float[133, 2] in the original frame; scores: float[133];
    scale: image pixels per keypoint unit.
  """
  out = image.copy()
  h, w = out.shape[:2]
  pts = keypoints * scale
  ok = scores > min_score

  def put(xy, color):
    x, y = np.round(xy[:, 0]).astype(int), np.round(xy[:, 1]).astype(int)
    keep = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    out[y[keep], x[keep]] = color

  for a, b, group in _bones():
    if ok[a] and ok[b]:
      n = int(np.linalg.norm(pts[b] - pts[a])) * 2 + 2
      put(pts[a] + np.linspace(0, 1, n)[:, None] * (pts[b] - pts[a]), _COLORS[group])
  face = np.arange(23, 91)
  put(pts[face[ok[face]]], _COLORS['face'])
  return out


def _sample_index(ds: SynthSign, split: str) -> int:
  """The first example of a split with a non-manual mark (so the sample shows one), else 0."""
  for i in range(min(ds.num_examples(split), 50)):
    if ds.language(split, i).signed.nonmanual:
      return i
  return 0


def write_sample(ds: SynthSign, out_dir: str, split: str = 'dev', index: int | None = None,
                 zoom: int = 3) -> str:
  """Writes sample_<id>.gif (+ .txt) of one example; returns the GIF's path."""
  index = _sample_index(ds, split) if index is None else index
  ex = ds.example(split, index)
  frames = ex['frames'].repeat(zoom, axis=1).repeat(zoom, axis=2)  # nearest-neighbour zoom
  overlay = np.stack([draw_skeleton((f * 0.45).astype(np.uint8), k, s, zoom)
                      for f, k, s in zip(frames, ex['keypoints'], ex['scores'])])
  clip = np.concatenate([frames, overlay], axis=2)
  lines = [f'id: {ex["id"]}', f'signer: {ex["signer"]}', f'glosses: {ex["glosses"]}',
           f'non-manual: {ex["nonmanual"] or "-"}', f'text: {ex["text"]}']
  lines += [f'paraphrase: {p}' for p in ex['paraphrases']]
  caption = '\n'.join(lines)
  path = os.path.join(out_dir, f'sample_{ex["id"]}.gif')
  write_gif(path, clip, ex['fps'], comment=caption)
  with open(path[:-4] + '.txt', 'w') as f:
    f.write(caption + '\n')
  return path


def write_gif(path: str, frames: np.ndarray, fps: float, comment: str = '') -> None:
  """Writes uint8[T, H, W, 3] as a looping GIF (Pillow), the caption in its comment block."""
  from PIL import Image  # pylint: disable=g-import-not-at-top  (only the describe mode needs it)
  images = [Image.fromarray(f) for f in frames]
  images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps),
                 loop=0, comment=comment.encode('utf-8'))


def _hist(values) -> dict[int, int]:
  return dict(sorted(collections.Counter(values).items()))


def _disk_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files)


def statistics(ds: SynthSign, pose_sample: int = 200) -> dict[str, Any]:
  """Dataset statistics (fast on a cached dataset: texts come from the manifest)."""
  rows = {s: [ds.example(s, i, frames=False) if s not in ds._manifest else ds._manifest[s][i]
              for i in range(ds.num_examples(s))] for s in SPLITS}
  glosses = {s: [r['glosses'].split() for r in rows[s]] for s in SPLITS}
  tokens = {s: [grammar.tokenize(r['text']) for r in rows[s]] for s in SPLITS}
  train_vocab = {w for t in tokens['train'] for w in t}
  train_glosses = collections.Counter(g for gs in glosses['train'] for g in gs)
  train_bags = {tuple(sorted(gs)) for gs in glosses['train']}
  corpus_vocab = {w for p in ds.text_corpus('train') for w in grammar.tokenize(p)}
  stats: dict[str, Any] = {
      'config': dataclasses.asdict(ds.config),
      'examples': {s: ds.num_examples(s) for s in SPLITS},
      'lexicon': lexicon.summary(),
      'phonology': {'handshapes': len(phonology.SHAPE_NAMES),
                    'orientations': len(phonology.ORIENTATIONS),
                    'locations': len(phonology.LOCATIONS), 'movements': len(phonology.MOVEMENTS),
                    'minimal_pairs': dict(collections.Counter(
                        p for _, _, p in phonology.minimal_pairs()))},
      'english_vocab_train_references': len(train_vocab),
      'english_vocab_train_corpus': len(corpus_vocab),
      'gloss_length_hist': {s: _hist(len(g) for g in glosses[s]) for s in SPLITS},
      'words_per_sentence': {s: round(float(np.mean([len(t) for t in tokens[s]])), 2)
                             for s in SPLITS},
      'paraphrases_hist': {s: _hist(len(r['paraphrases']) for r in rows[s]) for s in SPLITS},
      'nonmanual': {s: dict(collections.Counter(r['nonmanual'] or '-' for r in rows[s]))
                    for s in SPLITS},
      'signers': {s: sorted({r['signer'] for r in rows[s]}) for s in SPLITS},
      'left_handed_signers': list(signers.LEFT_HANDED),
      'train_gloss_count': {
          'glosses_seen': len(train_glosses), 'min': min(train_glosses.values()),
          'median': float(np.median(list(train_glosses.values()))),
          'max': max(train_glosses.values()),
          'rarest': [g for g, _ in sorted(train_glosses.items(), key=lambda x: (x[1], x[0]))[:5]]},
  }
  for s in ('dev', 'test'):
    toks = [w for t in tokens[s] for w in t]
    types = set(toks)
    stats.setdefault('oov', {})[s] = {
        'token_rate': round(sum(w not in train_vocab for w in toks) / max(len(toks), 1), 4),
        'type_rate': round(len(types - train_vocab) / max(len(types), 1), 4),
        'gloss_token_rate': round(float(np.mean([g not in train_glosses for gs in glosses[s]
                                                 for g in gs])), 4),
        'compositions_unseen_in_train': round(float(np.mean(
            [tuple(sorted(gs)) not in train_bags for gs in glosses[s]])), 4)}
  fps = ds.config.fps
  stats['duration_s'] = {}
  for s in SPLITS:
    n = np.array([r['num_frames'] if 'num_frames' in r else len(r['keypoints']) for r in rows[s]])
    stats['duration_s'][s] = {'mean': round(float(n.mean() / fps), 2),
                              'min': round(float(n.min() / fps), 2),
                              'max': round(float(n.max() / fps), 2), 'frames': int(n.sum())}
  drops, dom = [], []
  for i in range(min(pose_sample, ds.num_examples('train'))):
    ex = ds.example('train', i, frames=False)
    drops.append(pose_lib.hand_drop_rate(ex['scores']))
    d = slice(91, 112) if ex['signer'] in signers.LEFT_HANDED else slice(112, 133)
    dom.append(float((ex['scores'][:, d].max(1) == 0).mean()))
  stats['pose'] = {'hand_drop_rate': round(float(np.mean(drops)), 4),
                   'dominant_hand_drop_rate': round(float(np.mean(dom)), 4)}
  return stats


def _print(stats: dict[str, Any]):
  lex = stats['lexicon']
  print(f'SynthSign {stats["config"]["size"]} (seed {stats["config"]["seed"]}): '
        + ', '.join(f'{s} {n}' for s, n in stats['examples'].items()))
  print(f'lexicon: {lex["total"]} glosses (' + ', '.join(
      f'{c} {n}' for c, n in lex.items() if c != 'total') + ')')
  p = stats['phonology']
  print(f'phonology: {p["handshapes"]} handshapes, {p["orientations"]} orientations, '
        f'{p["locations"]} locations, {p["movements"]} movements; minimal pairs '
        f'{sum(p["minimal_pairs"].values())} {p["minimal_pairs"]}')
  print(f'English vocabulary (train references): {stats["english_vocab_train_references"]} '
        f'types; with paraphrases: {stats["english_vocab_train_corpus"]}')
  for s in SPLITS:
    print(f'{s}: glosses/sentence {stats["gloss_length_hist"][s]}, words/sentence '
          f'{stats["words_per_sentence"][s]}, duration {stats["duration_s"][s]}, '
          f'signers {stats["signers"][s]}')
    print(f'{s}: non-manual {stats["nonmanual"][s]}')
  for s, o in stats['oov'].items():
    print(f'{s} OOV vs train: tokens {o["token_rate"]:.2%}, types {o["type_rate"]:.2%}, '
          f'glosses {o["gloss_token_rate"]:.2%}; compositions unseen in train '
          f'{o["compositions_unseen_in_train"]:.0%}')
  g = stats['train_gloss_count']
  print(f'train gloss counts: {g["glosses_seen"]} seen, min {g["min"]}, median {g["median"]}, '
        f'max {g["max"]}; rarest {g["rarest"]}')
  print(f'pose estimator: hands dropped in {stats["pose"]["hand_drop_rate"]:.1%} of '
        f'(frame, hand), dominant hand {stats["pose"]["dominant_hand_drop_rate"]:.1%}')


def describe(ds: SynthSign, out_dir: str) -> dict[str, Any]:
  """Prints statistics, writes describe.json and a sample GIF into out_dir; returns the stats."""
  os.makedirs(out_dir, exist_ok=True)
  stats = statistics(ds)
  if ds._cache_dir:
    stats['disk_bytes'] = _disk_bytes(ds._cache_dir)
  stats['sample_gif'] = os.path.basename(write_sample(ds, out_dir))
  with open(os.path.join(out_dir, 'describe.json'), 'w') as f:
    json.dump(stats, f, indent=1, sort_keys=True, default=str)
  _print(stats)
  if 'disk_bytes' in stats:
    print(f'cache on disk: {stats["disk_bytes"] / 2**20:.1f} MiB')
  print(f'sample: {os.path.join(out_dir, stats["sample_gif"])} (+ .txt)')
  return stats


def prepare(size: str, out_dir: str, seed: int = 0, *, describe_too: bool = True,
            workers: int | None = None, image_size: int = 64, fps: float = 12.0) -> dict[str, Any]:
  """Generates and caches a SynthSign dataset in out_dir, and describes it; returns timings."""
  start = time.perf_counter()
  counts = SynthSign(size, seed, image_size=image_size, fps=fps).save(out_dir, workers=workers)
  saved = time.perf_counter()
  print(f'generated and cached {counts} in {saved - start:.1f} s -> {out_dir}')
  out = {'examples': counts, 'save_s': saved - start}
  if describe_too:
    describe(SynthSign.load(out_dir), out_dir)
    out['describe_s'] = time.perf_counter() - saved
    print(f'described in {out["describe_s"]:.1f} s')
  out['total_s'] = time.perf_counter() - start
  print(f'total {out["total_s"]:.1f} s')
  return out

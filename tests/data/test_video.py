"""Frames from PNG folders and encoded videos: order, sampling, resizing, and clear errors."""

import os

import numpy as np
import pytest
from PIL import Image

from rvlf_jax.data import video
from rvlf_jax.data.errors import VideoError

H, W = 48, 64
STEP = 8  # frame t is a flat grey of level STEP * t, so a decoded frame tells its own index


def grey(t, h=H, w=W):
  return np.full((h, w, 3), STEP * t, np.uint8)


def index_of(frames):
  return np.rint(frames.reshape(len(frames), -1).mean(axis=1) / STEP).astype(int).tolist()


@pytest.fixture
def png_folder(tmp_path):
  folder = tmp_path / 'frames'
  folder.mkdir()
  for t in range(12):  # images1.png .. images12.png: text order would put 10-12 before 2
    Image.fromarray(grey(t)).save(folder / f'images{t + 1}.png')
  (folder / 'notes.txt').write_text('not a frame')
  return str(folder)


@pytest.fixture(scope='module')
def mp4(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('video') / 'clip.mp4')
  video.write_video(path, [grey(t) for t in range(30)], fps=25)  # 1.2 s
  return path


# --- Frame folders.


def test_png_folder_in_numeric_order(png_folder):
  frames = video.load_frames(png_folder)
  assert frames.shape == (12, H, W, 3) and frames.dtype == np.uint8
  assert index_of(frames) == list(range(12))
  assert os.path.basename(video.list_frames(png_folder)[-1]) == 'images12.png'


def test_png_folder_resampled_and_resized(png_folder):
  frames = video.load_frames(png_folder, fps=25, target_fps=12.5, size=32, center_crop=True)
  assert frames.shape == (6, 32, 32, 3)
  assert index_of(frames) == [0, 2, 4, 6, 8, 10]
  with pytest.raises(ValueError, match='pass fps='):
    video.load_frames(png_folder, target_fps=12.5)


def test_grey_and_rgba_images_become_rgb(tmp_path):
  folder = tmp_path / 'modes'
  folder.mkdir()
  Image.fromarray(np.full((4, 6), 200, np.uint8), mode='L').save(folder / '0.png')
  Image.fromarray(np.full((4, 6, 4), 100, np.uint8), mode='RGBA').save(folder / '1.png')
  frames = video.load_frames(str(folder))
  assert frames.shape == (2, 4, 6, 3)
  assert np.all(frames[0] == 200) and np.all(frames[1] == 100)


def test_folder_errors(tmp_path, png_folder):
  with pytest.raises(VideoError, match='no such folder') as info:
    video.read_frame_folder(tmp_path / 'missing')
  assert info.value.path == str(tmp_path / 'missing')
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'readme.txt').write_text('x')
  with pytest.raises(VideoError, match='holds no frame images'):
    video.load_frames(str(tmp_path / 'empty'))
  Image.fromarray(grey(0, h=20)).save(os.path.join(png_folder, 'images13.png'))
  with pytest.raises(VideoError, match='images13.png is .20, 64, 3., the first is .48, 64, 3.'):
    video.load_frames(png_folder)
  bad = os.path.join(png_folder, 'images14.png')
  with open(bad, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n broken')
  with pytest.raises(VideoError, match='cannot decode image') as info:
    video.load_frames(png_folder)
  assert info.value.path == bad


# --- Video files.


def test_video_decodes_every_frame(mp4):
  frames, fps = video.read_video(mp4)
  assert frames.shape == (30, H, W, 3) and frames.dtype == np.uint8 and fps == 25.0
  assert index_of(frames) == list(range(30))


def test_video_clip_and_resampling(mp4):
  frames, _ = video.read_video(mp4, start=0.4, end=0.8)  # frames at 0.40, 0.44, ..., 0.76 s
  assert index_of(frames) == list(range(10, 20))
  frames = video.load_frames(mp4, target_fps=10)  # one frame every 0.1 s of a 25 fps video
  assert index_of(frames) == [0, 3, 5, 8, 10, 13, 15, 18, 20, 23, 25, 28]
  frames = video.load_frames(mp4, start=0.2, target_fps=12.5, size=(24, 40))
  assert frames.shape == (13, 24, 40, 3) and index_of(frames) == list(range(5, 30, 2))


def test_video_errors(tmp_path, mp4):
  with pytest.raises(VideoError, match='no such file'):
    video.load_frames(str(tmp_path / 'missing.mp4'))
  with open(mp4, 'rb') as f:
    data = f.read()
  truncated = tmp_path / 'truncated.mp4'
  truncated.write_bytes(data[:len(data) // 2])
  garbage = tmp_path / 'garbage.mp4'
  garbage.write_bytes(b'not a video ' * 100)
  for path in (truncated, garbage):
    with pytest.raises(VideoError, match='cannot decode') as info:
      video.load_frames(str(path))
    assert info.value.path == str(path)
  with pytest.raises(VideoError, match='decoded no frames between 5 s and 6 s'):
    video.read_video(mp4, start=5, end=6)
  with pytest.raises(ValueError, match='must be after start'):
    video.read_video(mp4, start=1, end=1)


# --- Sampling and resizing.


def test_sample_indices():
  np.testing.assert_array_equal(video.sample_indices(10, 25, 12.5), [0, 2, 4, 6, 8])
  np.testing.assert_array_equal(video.sample_indices(5, 25, None), range(5))
  np.testing.assert_array_equal(video.sample_indices(5, 25, 50), range(5))  # never duplicates
  picked = video.sample_indices(300, 30, 25)  # 10 s at 30 fps -> 25 fps
  assert len(picked) == 250 and len(set(picked.tolist())) == 250
  assert np.all(np.diff(picked) >= 1) and np.diff(picked).max() == 2
  with pytest.raises(ValueError, match='positive'):
    video.sample_indices(5, 25, 0)


def test_select_by_time_after_a_gap():
  # 25 fps with a gap of ~0.9 s: sampling at 10 fps resumes on its grid instead of catching up.
  times = [0.0, 0.04, 0.08, 1.0, 1.04, 1.08, 1.12, 1.16, 1.2]
  np.testing.assert_array_equal(video.select_by_time(times, 10), [0, 3, 6, 8])
  np.testing.assert_array_equal(video.select_by_time(times, None), range(9))


def test_resize_frames():
  wide = np.zeros((2, 40, 120, 3), np.uint8)
  wide[:, :, :40] = 255  # left third white
  wide[:, :, 40:80, 1] = 255  # middle third green
  cropped = video.resize_frames(wide, 20, center_crop=True)
  assert cropped.shape == (2, 20, 20, 3)
  assert np.all(cropped[..., 1] == 255) and np.all(cropped[..., 0] == 0)  # only the middle remains
  stretched = video.resize_frames(wide, 20)
  assert stretched[0, :, 0, 0].min() == 255 and stretched[0, :, -1].max() == 0  # everything kept
  tall = np.full((1, 100, 50, 3), 77, np.uint8)
  for resample in video.RESAMPLE:
    out = video.resize_frames(tall, (30, 20), resample=resample)
    assert out.shape == (1, 30, 20, 3) and np.all(out == 77)
  assert video.resize_frames(tall, (100, 50)) is tall
  with pytest.raises(ValueError, match='resample must be one of'):
    video.resize_frames(tall, 8, resample='lanczos')

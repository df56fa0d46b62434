"""The statistics: computed from any images, kept in one file by one writer and one reader,
and loaded for training with the ImageNet constants where there is none."""

import io

import numpy as np
import pytest
from conftest import jpeg
from PIL import Image

from alexnet_jax.core.errors import UserInputError
from alexnet_jax.data import stats as stats_lib
from alexnet_jax.data.stats import Stats, image_stats, load_stats, read_stats, write_stats


def pixels(seed, side=16):
  """A side x side RGB image of smooth random colours, decoded."""
  return np.asarray(Image.open(io.BytesIO(jpeg(seed, size=(side, side)))))


def test_image_stats_are_the_mean_image_and_the_colour_pca():
  images = [pixels(seed) for seed in range(5)]
  stats = image_stats(iter(images))
  np.testing.assert_allclose(stats.mean_image, np.mean(images, 0), rtol=1e-6)
  rgb = np.concatenate([i.reshape(-1, 3) for i in images]) / 255.0
  eigval, eigvec = np.linalg.eigh(np.cov(rgb.T, bias=True))  # every pixel, the same weight
  np.testing.assert_allclose(stats.eigval, eigval[::-1], rtol=1e-4)
  np.testing.assert_allclose(np.abs(stats.eigvec), np.abs(eigvec[:, ::-1]), atol=1e-4)
  assert stats.num_images == 5
  with pytest.raises(UserInputError, match="no readable training images"):
    image_stats(iter([]))


def test_the_file_reads_back_as_written_and_a_side_that_differs_is_named(tmp_path):
  saved = image_stats(iter([pixels(0), pixels(1)]))
  assert read_stats(str(tmp_path)) is None and read_stats("") is None
  write_stats(str(tmp_path), saved)
  back = read_stats(str(tmp_path))
  for key in ("mean_image", "eigval", "eigvec"):
    np.testing.assert_array_equal(getattr(back, key), getattr(saved, key))
  assert back.num_images == 2 and (tmp_path / stats_lib.STATS_FILE).exists()
  loaded = load_stats(str(tmp_path), 16, (0, 0, 0))
  np.testing.assert_array_equal(loaded.mean_image, saved.mean_image)
  with pytest.raises(UserInputError, match="16-pixel mean image but resize_size=32"):
    load_stats(str(tmp_path), 32, (0, 0, 0))


def test_without_a_file_training_takes_the_channel_mean_and_imagenets_colour_pca():
  stats = load_stats("", 8, (1.0, 2.0, 3.0))
  np.testing.assert_array_equal(stats.mean_image[5, 7], [1, 2, 3])
  np.testing.assert_array_equal(stats.eigval, np.float32(stats_lib.IMAGENET_EIGVAL))
  assert stats.num_images == 0


def test_channel_mean_subtraction_flattens_the_mean_image(tmp_path):
  mean_image = np.zeros((4, 4, 3), np.float32)
  mean_image[0, 0] = [16.0, 32.0, 48.0]
  write_stats(str(tmp_path), Stats(mean_image, np.ones(3, np.float32), np.eye(3, dtype=np.float32)))
  flat = load_stats(str(tmp_path), 4, (0, 0, 0), per_pixel=False)
  np.testing.assert_allclose(flat.mean_image, np.broadcast_to([1.0, 2.0, 3.0], (4, 4, 3)))


def test_statistics_are_written_to_and_read_from_a_bucket(gcs):
  bucket = f"{gcs.bucket()}/data"
  assert read_stats(bucket) is None
  stats = image_stats(pixels(seed) for seed in range(3))
  write_stats(bucket, stats)
  assert gcs.files(bucket) == [f"{bucket}/stats.npz"]
  back = read_stats(bucket)
  np.testing.assert_array_equal(back.mean_image, stats.mean_image)
  assert back.num_images == 3
  with pytest.raises(UserInputError, match=r"gs://.*/data/stats.npz holds a 16-pixel"):
    load_stats(bucket, 32, (0, 0, 0))

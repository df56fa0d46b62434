"""Which files are images: the one list of extensions that image folders, `prepare` and
feature extraction all go by, and the largest image they read. No TensorFlow here: `prepare`
counts files before importing it."""

from __future__ import annotations

import os

from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
NAMED = "/".join(IMAGE_EXTENSIONS)  # for messages: ".jpg/.jpeg/.png"
# Larger images are unreadable, as PIL deems them (~89M pixels): a 242 KB PNG can declare
# 16000x16000 pixels, 780 MB decoded. Checked from the header, before any decoding.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


def is_image(file_name: str) -> bool:
  """An image by its extension, in any case; hidden files (macOS's ._x.jpg) are not."""
  name = os.path.basename(file_name)
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")

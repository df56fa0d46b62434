"""Which files are images: the one list of extensions that image folders, `prepare` and
feature extraction all go by. No TensorFlow here: `prepare` counts files before importing it."""

from __future__ import annotations

import os

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
NAMED = "/".join(IMAGE_EXTENSIONS)  # for messages: ".jpg/.jpeg/.png"


def is_image(file_name: str) -> bool:
  """An image by its extension, in any case; hidden files (macOS's ._x.jpg) are not."""
  name = os.path.basename(file_name)
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")

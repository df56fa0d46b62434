"""The error for bad user input (config, data, checkpoints): `main` prints it as one line."""


class UserInputError(ValueError):
  """Something the user gave is wrong; the message says what and how to fix it."""

"""The one error type of the data pipeline."""


class DataError(ValueError):
  """A data or data-config problem the user can fix; the message names the file/line or field and the fix."""

"""One line for a bad command-line flag, naming the flag and the fix, in every entry point that takes `--config`.

absl and ml_collections report a config typo as a traceback or in their own words: a KeyError's repr, a config
file's load failure with the loader's traceback inside, "Failed to parse ... as a ConfigDict". An entry point
defines its flag with `define_config` and runs `app.run(main, flags_parser=parse_flags)`; a bad flag then prints
one line and exits 2, before anything is written. Both are needed: ml_collections applies sys.argv's overrides to
a default config file as the flag is defined, so a typo with no `--config=` given raises at definition.
"""

from __future__ import annotations

import re
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

BAD_INPUT_EXIT_CODE = 2  # as absl's own usage errors: the run never started
_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError)


def define_config(default: str | None, help_string: str):
  """`--config=file[:preset]` (config_flags.DEFINE_config_file), whose overrides' errors are one line."""
  try:
    return config_flags.DEFINE_config_file("config", default, help_string)
  except _FLAG_ERRORS as error:
    _exit(flag_error_line(error, sys.argv, default))


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with a config typo or bad value reported in one line instead of a traceback."""
  try:
    remaining = flags.FLAGS(argv)
    config = flags.FLAGS["config"].value
  except _FLAG_ERRORS as error:
    _exit(flag_error_line(error, argv, flags.FLAGS["config"].default_as_str.strip("'")))
  if config is None:
    _exit("--config is required: give a run config, e.g. --config=configs/multi_domain.py:transfer")
  try:
    config.keys()  # a config file that failed to load raises here, not while parsing
  except OSError as error:
    _exit(flag_error_line(error, argv, None))
  return remaining


def _exit(line: str):
  print(f"config error: {line}", file=sys.stderr)
  sys.exit(BAD_INPUT_EXIT_CODE)


def flag_error_line(error: Exception, argv: list[str], default: str | None) -> str:
  """absl's and ml_collections' words for a bad flag, as one line that names the flag and the fix; `default`:
  the config file[:preset] that --config takes when argv gives none."""
  raw = str(error)
  given = next((arg for arg in reversed(argv) if arg.startswith("--config=")), None)
  if isinstance(error, OSError) or "Error whilst parsing config file" in raw:
    # The config file or its preset: ml_collections' message carries the loader's traceback; the last line is why.
    cause = re.sub(r"^\w+: ", "", [line.strip() for line in raw.splitlines() if line.strip()][-1]).rstrip(".")
    return f"{given or '--config'}: {cause}; pass a config file and preset, e.g. --config=configs/multi_domain.py:tiny"
  message = raw[1:-1] if raw[:1] == raw[-1:] == "'" else raw  # KeyError/AttributeError repr quoting
  message = message.replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
  group = re.match(r"flag (--config[\w.]*)=(.*): Failed to parse .* as a ConfigDict", message)
  if group:  # a whole group of fields (e.g. data.domains) given as one value; ml_collections' own words name no fix
    flag, value = group.groups()
    return (f"{flag}={value}: this field is a group of fields, not one value; set one of them with "
            f"{flag}.<name>=<value>, or give the whole group as a Python dict literal")
  near = re.match(r"'(\w+)' Did you mean", message)
  if near:  # ml_collections' suggestion, led by the flag it is about
    flag = next((arg.split("=", 1)[0] for arg in argv
                 if arg.startswith("--config.") and near[1] in arg.split("=", 1)[0].split(".")), None)
    return f"{flag}: {message}" if flag else message
  config_file = given.removeprefix("--config=") if given else default
  if not config_file:
    return message
  try:  # an override naming no field, and no near name: list its group's fields
    config = ConfigFileFlagParser("config", lock_config=False).parse(config_file)  # as the flag loads it
    return next(filter(None, (_unknown_field(config, arg) for arg in argv)), message)
  except Exception:  # pylint: disable=broad-except  (only a better message is lost; absl's is still true)
    return message


def _unknown_field(config: ml_collections.ConfigDict, arg: str) -> str | None:
  """For `--config.a.b.c=v` naming a field the config lacks: the line naming it and its group's fields."""
  if not arg.startswith("--config."):
    return None
  flag = arg.split("=", 1)[0]
  group, parents = config, ["config"]
  for name in flag.removeprefix("--config.").split("."):
    if not hasattr(group, "keys"):
      return f"{flag}: {'.'.join(parents)} is one value, not a group of fields; set it with --{'.'.join(parents)}=<value>"
    if name not in group:
      return f"{flag}: {'.'.join(parents)} has no field {name!r}; its fields are {', '.join(sorted(group.keys()))}"
    group, parents = group[name], [*parents, name]
  return None

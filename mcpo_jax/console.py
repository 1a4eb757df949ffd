"""What the entry points print: our lines and library warnings, not the libraries' INFO chatter.

Called first in every program's main() (run.py, the experiments, the data tools), before transformers
or reasoning-gym is imported: without PyTorch, transformers says at import that it found none (we
need only its tokenizers); reasoning-gym imports pyplot, whose first import announces its font cache;
orbax logs every checkpoint step at INFO through absl.
"""

import logging
import os


def quiet_libraries() -> None:
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.getLogger("matplotlib").setLevel(logging.ERROR)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)

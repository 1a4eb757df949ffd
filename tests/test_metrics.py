"""MetricsWriter: metrics.jsonl keeps the names as given; the TensorBoard event file gets legal tags."""

import logging
import struct

import numpy as np
from tensorboardX.proto import event_pb2

from mcpo_jax.metrics import MetricsWriter, read_metrics


def _event_scalars(directory) -> dict[tuple[int, str], float]:
  """Reads a TFRecord event file (u64 length, u32 crc, payload, u32 crc per record), CRCs unchecked."""
  scalars = {}
  for path in directory.glob("events.out.tfevents.*"):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack_from("<Q", data, offset)
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars[(event.step, value.tag)] = value.simple_value
  return scalars


def test_names_in_jsonl_and_tags_in_tensorboard(tmp_path, caplog):
  writer = MetricsWriter(tmp_path)
  with caplog.at_level(logging.INFO):
    writer.write(3, {"eval/mean/pass@1": 0.25, "loss": np.float32(1.5), "diag/grad_cosine": [[1.0, 0.5], [0.5, 1.0]]})
    writer.write(4, {"eval/mean/pass@1": 0.5, "loss": float("nan")})
  writer.close()
  assert not [r for r in caplog.records if "illegal" in r.getMessage()]
  jsonl = read_metrics(tmp_path)
  assert jsonl[3] == {"step": 3, "eval/mean/pass@1": 0.25, "loss": 1.5, "diag/grad_cosine": [[1.0, 0.5], [0.5, 1.0]]}
  assert jsonl[4]["eval/mean/pass@1"] == 0.5 and jsonl[4]["loss"] == "nan"
  scalars = _event_scalars(tmp_path / "tensorboard")
  assert scalars[(3, "eval/mean/pass_1")] == 0.25 and scalars[(4, "eval/mean/pass_1")] == 0.5
  assert scalars[(3, "loss")] == 1.5 and np.isnan(scalars[(4, "loss")])
  assert not any("@" in tag for _, tag in scalars)

"""MetricsWriter: metrics.jsonl keeps the names as given; the TensorBoard event file gets legal tags."""

import json
import logging
import struct
import time

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from mcpo_jax.metrics import MetricsWriter, read_metrics


def _events(path):
  """The events of a TFRecord event file (u64 length, u32 crc, payload, u32 crc per record), CRCs unchecked."""
  data, offset = path.read_bytes(), 0
  while offset < len(data):
    (length,) = struct.unpack_from("<Q", data, offset)
    yield event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4


def _event_scalars(directory) -> dict[tuple[int, str], float]:
  return {(event.step, value.tag): value.simple_value for path in directory.glob("events.out.tfevents.*")
          for event in _events(path) for value in event.summary.value}


def purged_event_scalars(directory) -> dict[tuple[int, str], list[float]]:
  """{(step, tag): value} as TensorBoard shows a run's event files: read oldest first, and a SessionLog START
  at step s (a resumed writer's purge_step) hides every earlier event at step >= s. Raises on a (step, tag)
  that is still logged twice."""
  shown: dict[tuple[int, str], float] = {}
  for path in sorted(directory.glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[3])):
    for event in _events(path):
      if event.session_log.status == event_pb2.SessionLog.START:
        shown = {key: value for key, value in shown.items() if key[0] < event.step}
      for value in event.summary.value:
        assert (event.step, value.tag) not in shown, f"{value.tag} at step {event.step} shown twice"
        shown[(event.step, value.tag)] = value.simple_value
  return shown


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


def test_a_resumed_writer_supersedes_the_steps_after_its_start(tmp_path):
  """start_step=2: the rows and events of steps >= 3 from the earlier try go, steps 1-2 stay; from 0 all go."""
  first = MetricsWriter(tmp_path)
  for step in (1, 2, 3):
    first.write(step, {"loss": float(step)})
  first.close()
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 4, "loss"')  # a row torn by kill -9
  time.sleep(1.1)  # event files are named by the second they were opened in
  resumed = MetricsWriter(tmp_path, start_step=2)
  for step in (3, 4):
    resumed.write(step, {"loss": 10.0 * step})
  resumed.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0},
                  {"step": 4, "loss": 40.0}]
  assert purged_event_scalars(tmp_path / "tensorboard") == {(1, "loss"): 1.0, (2, "loss"): 2.0, (3, "loss"): 30.0,
                                                            (4, "loss"): 40.0}
  time.sleep(1.1)
  MetricsWriter(tmp_path, start_step=0).close()
  assert (tmp_path / "metrics.jsonl").read_text() == ""
  assert purged_event_scalars(tmp_path / "tensorboard") == {}


def test_the_reader_sees_a_step_logged_twice(tmp_path):
  """The check above can fail: a writer that does not resume (start_step=None) appends a second try's step."""
  for _ in range(2):
    writer = MetricsWriter(tmp_path)
    writer.write(1, {"loss": 1.0})
    writer.close()
    time.sleep(1.1)
  with pytest.raises(AssertionError, match="loss at step 1 shown twice"):
    purged_event_scalars(tmp_path / "tensorboard")


def test_wandb_offline_run_holds_the_config_and_the_final_per_domain_eval(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  writer = MetricsWriter(tmp_path, wandb_project="mcpo-test", config_json=json.dumps({"algorithm": "mcpo"}))
  writer.write(0, {"eval/add_digits/pass@1": 0.1, "eval/add_words/pass@1": 0.0})
  writer.write(1, {"loss": 0.5, "diag/grad_cosine": [[1.0, -0.2], [-0.2, 1.0]]})
  writer.write(2, {"eval/add_digits/pass@1": 0.25, "eval/add_words/pass@1": 0.05, "eval/mean/pass@1": 0.15})
  run = writer.wandb_run
  summary = {key: run.summary[key] for key in ("eval/add_digits/pass@1", "eval/add_words/pass@1", "loss", "step")}
  assert summary == {"eval/add_digits/pass@1": 0.25, "eval/add_words/pass@1": 0.05, "loss": 0.5, "step": 2}
  assert run.config["algorithm"] == "mcpo" and run.offline
  writer.close()
  # The offline run directory (`wandb sync` uploads it): the run's log and the cosine and eval tables.
  (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
  assert list(run_dir.glob("*.wandb")) and (run_dir / "files/media/table/diag").is_dir()
  assert len(list((run_dir / "files/media/table/eval").glob("table_*.table.json"))) == 2  # one per eval step

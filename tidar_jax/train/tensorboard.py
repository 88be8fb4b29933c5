"""TensorBoard scalars written with the ``tensorboard`` package alone (no TensorFlow), process 0 only."""

from __future__ import annotations

import math
import time

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class ScalarWriter:
    """``write(step, {"train/loss": 1.2, ...})``; a disabled writer (``enabled=False``) accepts and drops everything."""

    def __init__(self, log_dir: str, enabled: bool = True):
        self._writer = EventFileWriter(log_dir) if enabled else None

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is None:
            return
        values = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()
                  if v is not None and math.isfinite(float(v))]
        if values:
            self._writer.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

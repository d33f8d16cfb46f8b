"""Over-steps charts follow training when a run trained, every phase otherwise."""
import dataclasses
import uuid

import numpy as np
import pyarrow as pa

from moescope.dashboard.summaries import series_phase

from .conftest import RUN, STEPS, make_frame


def relabelled(frame, phase, *, run=None, seq=None):
    tables = {}
    for name, table in frame.tables.items():
        table = table.set_column(table.schema.get_field_index("phase"), "phase", pa.array([phase] * table.num_rows, pa.string()))
        if run is not None:
            table = table.set_column(table.schema.get_field_index("run"), "run", pa.array([run] * table.num_rows, pa.string()))
        tables[name] = table
    return dataclasses.replace(frame, tables=tables, run=run or frame.run, seq=seq if seq is not None else frame.seq,
                               frame_id=uuid.uuid4().hex, final=False)


def test_training_runs_chart_the_train_phase_and_leave_replays_out(recorded_store):
    replay = relabelled(make_frame(STEPS, np.random.default_rng(5), producer="replay"), "eval", seq=0)
    assert recorded_store.write_frame(replay)
    assert series_phase(recorded_store, RUN) == "train"


def test_runs_without_training_chart_every_phase(recorded_store):
    serving = relabelled(make_frame(0, np.random.default_rng(6), producer="serve"), "decode", run="serving-run", seq=0)
    assert recorded_store.write_frame(serving)
    assert series_phase(recorded_store, "serving-run") is None

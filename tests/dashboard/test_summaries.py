"""Run health reads the run's segments once for all of its metrics."""
from moescope.dashboard import summaries

from .conftest import RUN


def test_run_health_lists_the_runs_segments_once_for_its_seven_metric_calls(recorded_store, monkeypatch):
    want = summaries.run_health(recorded_store, RUN, now=0.0)
    listings = []
    original = recorded_store._live_segments
    monkeypatch.setattr(recorded_store, "_live_segments", lambda run: listings.append(run) or original(run))
    assert summaries.run_health(recorded_store, RUN, now=0.0) == want
    assert listings == [RUN] and want["maxvio"] is not None and want["collapse"] is not None


def test_id_ranges_join_consecutive_ids():
    assert summaries.id_ranges([9, 1, 2, 3, 7, 10]) == "1–3, 7, 9–10"
    assert summaries.id_ranges([4]) == "4" and summaries.id_ranges([]) == ""

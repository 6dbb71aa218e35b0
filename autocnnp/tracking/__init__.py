"""Tracking, in one home: what a run's events become besides metrics.csv.

* the trackers (``<monitoring tracker="...">``, several at once) are built-ins of
  ``autocnnp/components/trackers/`` (the tracker registry finds them there), with MLflow's sender
  (``mlflow_tracking.py``: the journal, the sender process, the run's start and end);
* ``dashboard.py``: ``autocnnp dashboard`` and ``autocnnp track sync``;
* ``zoo.py``: the model zoo on MLflow's model registry.

The names below are what run & manage, the dashboard and the zoo use of the sender.
"""

from ..components.trackers.mlflow_tracking import FOLLOWED, FrontEnd, Sender, close_journal, store_of

__all__ = ["FOLLOWED", "FrontEnd", "Sender", "close_journal", "store_of"]

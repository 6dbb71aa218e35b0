"""Checkpoint plug-in of thesis Listing 4.1: records the learning rate each epoch (torch-free)."""


class LRSchedule:
    """Remembers the learning rate seen at the end of every epoch and saves it with the checkpoint."""

    def __init__(self):
        self.history = []

    def on_epoch_end(self, epoch, metrics, state):
        self.history.append((epoch, metrics.get("lr")))

    def state_dict(self):
        return {"history": list(self.history)}

    def load_state_dict(self, d):
        self.history = list(d["history"])

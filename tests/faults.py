"""A stage that raises on demand: the fault-isolation tests' one way of poisoning a batch."""

from __future__ import annotations


def raise_on(monkeypatch, stage, word: str = "BOOM", message: str = "simulated kernel failure"):
    """Make ``stage.step`` raise while the stage holds a request whose text contains ``word``.

    Returns a dict whose ``"raised"`` counts the failed steps.
    """
    real_step = stage.step
    calls = {"raised": 0}

    def step():
        if any(word in row.req.text for _, row in stage.slots.items()):
            calls["raised"] += 1
            raise RuntimeError(message)
        return real_step()

    monkeypatch.setattr(stage, "step", step)
    return calls

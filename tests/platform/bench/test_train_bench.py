"""`ioulab bench train` times its rows interleaved, so a change of machine load hits every row."""
from ioulab.platform.bench.train import _seconds_per_step


class FakeStepper:
    def __init__(self, name, seconds_per_step, calls):
        self.name, self.seconds_per_step, self.calls = name, seconds_per_step, calls

    def timed(self, n):
        self.calls.append((self.name, n))
        return n * self.seconds_per_step


def test_rows_are_interleaved_and_every_timed_step_counts():
    calls = []
    a, b = FakeStepper("a", 0.5, calls), FakeStepper("b", 2.0, calls)
    seconds = _seconds_per_step([a, b], warmup=2, iters=10, rounds=4)
    assert seconds == [0.5, 2.0]
    # warmup of each, then 4 rounds alternating a, b with 3+3+2+2 = 10 steps each
    assert calls == [("a", 2), ("b", 2), ("a", 3), ("b", 3), ("a", 3), ("b", 3),
                     ("a", 2), ("b", 2), ("a", 2), ("b", 2)]

"""Progress in a log file: a line every 5% with the count, rate and ETA, one at the end, nothing when disabled."""

import io

from megatron_qsparse.progress import LineProgress, progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_line_every_five_percent_with_rate_and_eta():
    clock, out = Clock(), io.StringIO()
    bar = LineProgress(200, "tokenizing", "doc", False, out, clock=clock)
    for _ in range(200):
        clock.now += 0.5
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 21  # 5%, 10%, ..., 100%, then the closing line
    assert lines[0] == "tokenizing: 5% 10/200 doc, 2.0 doc/s, 5s elapsed, ETA 1m35s"
    assert lines[-1] == "tokenizing: 100% 200/200 doc, 2.0 doc/s, 1m40s elapsed, done"


def test_without_a_total_a_line_every_half_minute():
    clock, out = Clock(), io.StringIO()
    bar = LineProgress(None, "fetching", "MB", False, out, clock=clock)
    for _ in range(10):
        clock.now += 10
        bar.update(2.5)
    assert out.getvalue().splitlines() == [
        "fetching: 7.5 MB, 0.2 MB/s, 30s elapsed",
        "fetching: 15 MB, 0.2 MB/s, 1m00s elapsed",
        "fetching: 22.5 MB, 0.2 MB/s, 1m30s elapsed",
    ]


def test_disabled_and_not_a_terminal():
    out = io.StringIO()
    with progress(total=3, desc="x", disable=True, stream=out) as bar:
        bar.update(3)
    assert out.getvalue() == ""
    with progress(total=3, desc="x", stream=out) as bar:  # StringIO is no terminal: plain lines
        assert isinstance(bar, LineProgress)
        bar.update(3)
    assert out.getvalue().splitlines()[-1].startswith("x: 100% 3/3 it")

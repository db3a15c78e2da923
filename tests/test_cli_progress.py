"""The small progress bar of the CLI (varformer/_progress.py)."""

import io

import pytest

from varformer._progress import Progress, format_seconds


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_silent_when_not_a_tty():
    s = io.StringIO()
    with Progress(5, "tiles", stream=s) as p:
        for _ in range(5):
            p.update()
    assert s.getvalue() == ""


def test_draws_done_total_and_ends_line():
    s = _Tty()
    p = Progress(3, "tiles", stream=s, min_interval=0.0)
    p.update()
    assert "1/3" in s.getvalue() and "ETA" in s.getvalue()
    p.update(2)
    p.close()
    p.close()  # idempotent
    out = s.getvalue()
    assert "3/3" in out and "100%" in out and out.endswith("\n") and out.count("\n") == 1
    assert "tiles" in out


def test_unknown_total_counts():
    s = _Tty()
    p = Progress(None, "steps", stream=s, min_interval=0.0)
    p.update(4)
    p.set_postfix("loss 0.5")
    p.close()
    assert "steps  4" in s.getvalue() and "loss 0.5" in s.getvalue()


def test_bad_total():
    with pytest.raises(ValueError, match="total"):
        Progress(-1)
    with pytest.raises(ValueError, match="total"):
        Progress(2.5)


def test_format_seconds():
    assert format_seconds(3.2) == "3s"
    assert format_seconds(95) == "1m35s"
    assert format_seconds(4000) == "1h06m"
    assert format_seconds(float("nan")) == "?"

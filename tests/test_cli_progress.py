"""Progress bars of the commands (``prfaas.cli_progress``): on a terminal ``generate`` and
``profile`` show a bar from the start (torch's import is its first step), the model being built,
then their counted work; off a terminal (logs, pipes) nothing is drawn."""

from __future__ import annotations

import io
import re
import sys
import time

import pytest

from prfaas.cli import main
from prfaas.cli_progress import counter, stages


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_stages_name_the_running_step_and_time_moves(monkeypatch):
    monkeypatch.setattr("prfaas.cli_progress.REFRESH_S", 0.05)
    f = Terminal()
    with stages("job", ["one", "two"], file=f) as st:
        time.sleep(0.3)  # redrawn meanwhile, not only when a step ends
        st.next()
    out = f.getvalue()
    assert "job: one (1/2)" in out and "job: two (2/2)" in out
    assert out.count("job: one (1/2)") >= 2  # redrawn while the step ran
    assert out.endswith("\r")  # the bar goes away (leave=False)


def test_no_bar_off_a_terminal():
    f = io.StringIO()
    with stages("job", ["one"], file=f) as st:
        st.next()
    with counter("job", 3, "req", file=f) as bar:
        bar.update(3)
    assert f.getvalue() == ""


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ["generate", "--model", "tiny", "--device", "cpu", "--max-tokens", "2", "a", "b"],
            ["generate: loading torch (1/3)", "generate: building tiny on cpu (2/3)", "req"],
        ),
        (
            ["profile", "--model", "tiny", "--device", "cpu", "--lengths", "8", "16"]
            + ["--batches", "1", "--ctx", "8", "--steps", "1"],
            [
                "profile: loading torch (1/2)",
                "profile: building tiny on cpu (2/2)",
                "prefill 16:",
            ],
        ),
    ],
)
def test_generate_and_profile_show_progress_on_a_terminal(monkeypatch, capsys, args, words):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(args) == 0
    out = term.getvalue()
    for w in words:
        assert w in out, (w, out)
    # the counted bar reached its total (n/n) and never went past it
    counts = [(int(a), int(b)) for a, b in re.findall(r"\| (\d+)/(\d+) \[", out)]
    assert counts and counts[-1][0] == counts[-1][1] and all(a <= b for a, b in counts), out
    capsys.readouterr()
    # the same off a terminal: the results only
    monkeypatch.undo()
    assert main(args) == 0
    assert "building" not in capsys.readouterr().err

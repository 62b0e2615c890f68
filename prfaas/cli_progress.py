"""Progress bars for the commands: tqdm on stderr, shown only when stderr is a terminal (logs and
pipes get none).  ``stages`` is for work in a few named steps where one step can take long (a
model built or loaded): the bar names the step running and is redrawn every ``REFRESH_S`` so its
elapsed time moves while a step runs; counted work (requests, measurements) uses ``counter``, redrawn the same way.
Imports no torch."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any

from tqdm import tqdm

REFRESH_S = 0.5


class Stages:
    """The steps of a ``stages`` bar: ``next()`` ends the step running and starts the next."""

    def __init__(self, bar: tqdm, desc: str, names: Sequence[str]) -> None:
        self.bar, self.desc, self.names, self.i = bar, desc, list(names), -1

    def next(self, name: str | None = None) -> None:
        """The next step starts (``name``: its name, when known only now)."""
        if self.i >= 0:
            self.bar.update()
        self.i += 1
        if name is not None and self.i < len(self.names):
            self.names[self.i] = name
        if self.i < len(self.names):
            n = len(self.names)
            self.bar.set_description_str(f"{self.desc}: {self.names[self.i]} ({self.i + 1}/{n})")


@contextmanager
def _refreshed(bar: tqdm) -> Iterator[tqdm]:
    """``bar`` redrawn every ``REFRESH_S`` from a thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(REFRESH_S):
            bar.refresh()

    t = None
    if not bar.disable:
        t = threading.Thread(target=loop, daemon=True, name="progress")
        t.start()
    try:
        yield bar
    finally:
        stop.set()
        if t is not None:
            t.join()
            bar.refresh()  # the last state (n/n) is drawn whatever the redraw timer did
        bar.close()


@contextmanager
def stages(desc: str, names: Sequence[str], file: IO[str] | None = None) -> Iterator[Stages]:
    """A bar over ``names``, the first started; it goes away when the block ends."""
    bar = tqdm(
        total=len(names),
        desc=desc,
        unit="step",
        file=file or sys.stderr,
        leave=False,
        disable=None,  # not a terminal: no bar
        bar_format="{desc} [{elapsed}]",
    )
    with _refreshed(bar):
        st = Stages(bar, desc, names)
        st.next()
        yield st


@contextmanager
def counter(
    desc: str, total: int, unit: str, file: IO[str] | None = None, **kw: Any
) -> Iterator[tqdm]:
    """A bar over ``total`` units of counted work, redrawn every ``REFRESH_S`` (a long unit
    still shows time moving); lines printed meanwhile go through its ``write`` so they do not
    break it."""
    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=file or sys.stderr,
        leave=False,
        disable=None,  # not a terminal: no bar
        dynamic_ncols=True,
        **kw,
    )
    with _refreshed(bar):
        yield bar

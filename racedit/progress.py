"""Progress bars and messages for long work, one behaviour everywhere (a leaf module: imports tqdm only).

On a terminal the bar redraws as usual. When stderr is not a terminal (CI, cluster logs, a file) it
redraws at most every 30 s, so a long run writes a line now and then instead of one carriage-return
update per step (a demo used to write ~1 MB of them into its log). A bar's ``set_postfix`` should pass
``refresh=False``, else it redraws at once and the interval does not hold.

Messages (what a command is doing) go to stderr as ``prog: message`` through :func:`say`, which does not
break a bar; results (tables, JSON, the paths written) go to stdout.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
        kwargs.setdefault("maxinterval", 60.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def say(prog: str, message: str) -> None:
    """``prog: message`` on stderr, without breaking a progress bar."""
    tqdm.write(f"{prog}: {message}", file=sys.stderr)
    sys.stderr.flush()

"""Progress bars of compress(): shown by default when someone watches (stderr is a terminal)."""

from __future__ import annotations

import sys

from tensorpress.compress import distributed as tpdist


def show_progress(progress: bool | None) -> bool:
    """progress=None: on when stderr is a terminal (someone is watching), off in logs and tests
    (and on the first process only under torch.distributed)."""
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)()) and tpdist.rank() == 0
    return bool(progress)


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)

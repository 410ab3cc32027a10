"""The one reader of CHATTUNE_NO_PROGRESS, the switch that turns progress bars off (training, data tools, eval).

    CHATTUNE_NO_PROGRESS=1 python -m eval.loss ...

"1", "true", "yes" and "on" (any case, surrounding spaces ignored) turn the bars off; unset, "", "0", "false", "no"
and "off" leave them on. Any other value also turns them off: whoever set the variable meant to silence the bars.
"""

from __future__ import annotations

import os

ENV_VAR = "CHATTUNE_NO_PROGRESS"
OFF_VALUES = frozenset({"", "0", "false", "no", "off"})  # bars stay on


def progress_disabled() -> bool:
    """Whether progress bars are turned off (CHATTUNE_NO_PROGRESS; see the module's docstring)."""
    return os.environ.get(ENV_VAR, "").strip().lower() not in OFF_VALUES

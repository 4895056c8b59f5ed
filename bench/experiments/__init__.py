"""Training experiments that are not product options: each recipe takes the same options as
`safepatch train` plus its own, and runs the factory's library step by step
(`app.factory.train.prepare` / `fit` / `finish`), adding its one change. Results:
docs/patch-results.md, which names the recipe beside each row it produced.

    python -m bench.experiments.refusal_tokens --refusal-tokens 6 -- SAFEPATCH-TRAIN-OPTIONS
    python -m bench.experiments.selective_against --against SPEC ... -- SAFEPATCH-TRAIN-OPTIONS
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence


def split_argv(argv: Sequence[str] | None, module: str) -> tuple[list[str], list[str], str]:
    """(recipe options, `safepatch train` options after `--`, the reproduce command)."""
    args = list(sys.argv[1:] if argv is None else argv)
    cut = args.index("--") if "--" in args else len(args)
    command = f"python -m {module} {shlex.join(args)}"
    return args[:cut], args[cut + 1 :], command

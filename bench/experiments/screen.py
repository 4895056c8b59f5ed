"""Screen candidate patches fast: refusal rate per set through the real engine, without the
KL pass of `safepatch eval` (minutes instead of tens of minutes on the 2-core CPU).

    SAFEPATCH_DATA_DIR=../shared/data python -m bench.experiments.screen \
        --patch adapters/refusal-general --patch /tmp/candidate \
        --set "multijail_en.csv?limit=100&name=multijail" harmful \
        --set "jbb_benign.csv?name=jbb-benign" benign --json screen.json

Sets are read as given (a spec's own `split=` applies; no automatic dev split), so say
`split=dev` for a file a candidate trained on. Prints one row per set and configuration;
the JSON also keeps every response, for reading.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.config import Settings
from app.factory.evaluate import BASE, build_configs, generate, temp_work_dir
from app.factory.judge import default_judge
from app.factory.sets import build_sets
from app.model.default_model import resolve_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", action="append", default=[], help="adapter directory")
    parser.add_argument("--set", nargs=2, action="append", metavar=("SPEC", "KIND"), default=[])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    settings = Settings()
    sets = build_sets(
        [spec for spec, _ in args.set],
        columns=None,
        kinds=[kind for _, kind in args.set],
        split=None,
        limit=None,
        training_files=set(),
    )
    judge = default_judge()
    with temp_work_dir() as work:
        configs = build_configs(args.patch, [], settings.adapters_dir, Path(work))
        outputs = generate(resolve_model_dir(settings), configs, sets, args.max_tokens, settings)
    rows = []
    for s in sets:
        for config in configs:
            texts = outputs[(config.name, s.name)].texts
            refused = [judge.is_refusal(p, t) for p, t in zip(s.prompts, texts, strict=True)]
            rows.append(
                {
                    "set": s.name,
                    "kind": s.kind,
                    "config": config.name if config.name == BASE else str(config.adapter_dir),
                    "n": len(texts),
                    "refusal_rate": sum(refused) / len(texts),
                    "responses": [
                        {"prompt": p, "response": t, "refused": r}
                        for p, t, r in zip(s.prompts, texts, refused, strict=True)
                    ],
                }
            )
    for row in rows:
        rate = f"{row['refusal_rate']:7.1%}"
        print(f"{row['set']:28s} {row['kind']:8s} {row['n']:4d} {rate}  {row['config']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

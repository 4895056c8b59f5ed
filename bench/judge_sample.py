"""Draw responses for the judge's labelled sample (tests/factory/data/judge_sample.jsonl).

Greedy answers of the base model and of the shipped patches, through the evaluation's own vLLM
generation, to a fixed mix of prompts from several vendored sources (harmful and benign, all
MIT / Apache / CC BY, so prompts and answers may live in the repository). Writes one JSON line
per response with `label: null`; every label is then set by reading the response (see
docs/patch-results.md, "The judge, checked").

    .venv/bin/python -m bench.judge_sample --out /tmp/judge_sample_raw.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from app.config import Settings
from app.factory.data import load_labelled, parse_source
from app.factory.evaluate import BASE, build_configs, generate
from app.factory.sets import PromptSet
from app.model.default_model import ensure_default_model

SOURCES = {  # spec -> (kind, prompts drawn)
    "multijail_en.csv?split=all": ("harmful", 18),
    "gptfuzz_questions.csv?split=all": ("harmful", 12),
    "catqa_en.csv?split=dev": ("harmful", 12),
    "donotanswer.csv?split=dev&where=category:Malicious Uses": ("harmful", 8),
    "coconot_unsafe.csv?split=dev&where=category:dangerous or sensitive topics": ("harmful", 8),
    "advbench_harmful_behaviors.csv?split=dev": ("harmful", 8),
    "xstest_prompts.csv?split=dev&where=label:safe": ("benign", 24),
    "jbb_benign.csv?split=all": ("benign", 14),
    "contrast_safe.jsonl?split=all": ("benign", 6),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--patch", action="append", default=["refusal-general"])
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    settings = Settings()
    model_dir = ensure_default_model(settings.cache_dir)
    sets = []
    for spec, (kind, count) in SOURCES.items():
        source = parse_source(f"{spec}&limit={count}")
        rows = load_labelled(source)
        sets.append(PromptSet(source.path.stem, kind, [p for p, _ in rows]))  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as work:
        configs = build_configs(args.patch, [], settings.adapters_dir, Path(work))
        outputs = generate(model_dir, configs, sets, args.max_tokens, settings)
    with args.out.open("w", encoding="utf-8") as fh:
        for config in configs:
            for prompt_set in sets:
                texts = outputs[(config.name, prompt_set.name)].texts
                for prompt, text in zip(prompt_set.prompts, texts, strict=True):
                    row = {
                        "source": prompt_set.name,
                        "kind": prompt_set.kind,
                        "model": BASE if config.name == BASE else f"{config.name} (v4)",
                        "prompt": prompt,
                        "response": text,
                        "label": None,
                    }
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()

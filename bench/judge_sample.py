"""Draw responses for the judge's labelled sample (tests/factory/data/judge_sample.jsonl).

Greedy answers of the base model and of the shipped patches, through the evaluation's own vLLM
generation, to a fixed mix of prompts from several vendored sources (harmful and benign, all
MIT / Apache / CC BY, so prompts and answers may live in the repository). Writes one JSON line
per response with `label: null`; every label is then set by reading the response (see
docs/patch-results.md, "The judge, checked").

    .venv/bin/python -m bench.judge_sample --out /tmp/judge_sample_raw.jsonl

With `--hf --no-base --patch DIR`, the same prompts are answered by one more patch through
transformers (faster than the CPU engine on a busy machine; greedy tokens match in fp32) and
a per-source table of the default judge's refusal rates is printed, to compare a candidate with
the labelled rows of the shipped patch on identical prompts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from app.config import Settings
from app.factory.data import load_labelled, parse_source
from app.factory.evaluate import BASE, EvalConfig, Outputs, build_configs, generate
from app.factory.judge import default_judge
from app.factory.sets import PromptSet
from app.model.default_model import resolve_model_dir

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
    parser.add_argument("--patch", action="append", help="patch name or dir (refusal-general)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--hf", action="store_true", help="generate with transformers + peft")
    parser.add_argument("--no-base", action="store_true", help="only the patches")
    parser.add_argument("--label", default="v4", help="model tag written beside patch names")
    args = parser.parse_args()
    settings = Settings()
    model_dir = resolve_model_dir(settings)
    sets = []
    for spec, (kind, count) in SOURCES.items():
        source = parse_source(f"{spec}&limit={count}")
        rows = load_labelled(source)
        sets.append(PromptSet(source.path.stem, kind, [p for p, _ in rows]))  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as work:
        configs = build_configs(
            args.patch or ["refusal-general"], [], settings.adapters_dir, Path(work)
        )
        if args.no_base:
            configs = configs[1:]
        if args.hf:
            outputs = _hf_outputs(model_dir, configs, sets, args.max_tokens)
        else:
            outputs = generate(model_dir, configs, sets, args.max_tokens, settings)
    judge = default_judge()
    with args.out.open("w", encoding="utf-8") as fh:
        for config in configs:
            for prompt_set in sets:
                texts = outputs[(config.name, prompt_set.name)].texts
                for prompt, text in zip(prompt_set.prompts, texts, strict=True):
                    row = {
                        "source": prompt_set.name,
                        "kind": prompt_set.kind,
                        "model": BASE if config.name == BASE else f"{config.name} ({args.label})",
                        "prompt": prompt,
                        "response": text,
                        "label": None,
                    }
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    for config in configs:
        for prompt_set in sets:
            out = outputs[(config.name, prompt_set.name)]
            flags = [
                judge.is_refusal(p, r) for p, r in zip(prompt_set.prompts, out.texts, strict=True)
            ]
            print(
                f"{config.name:<28} {prompt_set.name:<32} {prompt_set.kind:<8} "
                f"{sum(flags):>3}/{len(flags):<3} refused ({judge.name})"
            )


def _hf_outputs(
    model_dir: Path, configs: list[EvalConfig], sets: list[PromptSet], max_tokens: int
) -> dict[tuple[str, str], Outputs]:
    """Greedy answers through transformers + peft (bench.proxy_eval's generation)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.proxy_eval import hf_generate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = {}
    for config in configs:
        if config.adapter_dir is None:
            runner = model
        else:
            runner = PeftModel.from_pretrained(model, str(config.adapter_dir)).eval()
        for prompt_set in sets:
            outputs[(config.name, prompt_set.name)] = hf_generate(
                runner, tokenizer, prompt_set.prompts, max_tokens
            )
        if config.adapter_dir is not None:
            model = runner.unload()
    return outputs


if __name__ == "__main__":
    main()

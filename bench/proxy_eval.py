"""Fast HF + peft proxy of `safepatch eval` for training ablations (docs/patch-results.md).

The same dev sets, judge, scoring (`score_entry`) and KL (`mean_kls`) as the shipped
evaluation; only generation differs: transformers in fp32 instead of vLLM (greedy tokens match
vLLM's exactly in fp32), about 3 minutes per adapter on 2 cores. Prints the evaluation's table
and, with --json, writes its report.

    .venv/bin/python -m bench.proxy_eval ~/.cache/safepatch/experiments/c1
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from app.config import Settings
from app.factory.data import load_prompts, parse_source
from app.factory.evaluate import BASE, EvalConfig, Outputs, PromptSet, mean_kls, score_entry
from app.factory.judge import default_judge
from app.factory.preserve import greedy_targets
from app.factory.report import build_report, format_table, write_json
from app.model.default_model import ensure_default_model

REPO = Path(__file__).resolve().parents[1]
ADVBENCH = REPO / "app/factory/data/advbench_harmful_behaviors.csv"
XSTEST = REPO / "app/factory/data/xstest_prompts.csv"


def hf_generate(model: Any, tokenizer: Any, prompts: list[str], max_tokens: int) -> Outputs:
    """Greedy answers (token ids up to and including EOS, and their text) through transformers,
    by the trainer's own `greedy_targets`."""
    targets = greedy_targets(
        model, tokenizer, prompts, max_new_tokens=max_tokens, top_k=1, desc="greedy answers"
    )
    ids = [t.response_ids for t in targets]
    return Outputs(ids, [tokenizer.decode(i, skip_special_tokens=True) for i in ids])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path, help="PEFT adapter directory")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=REPO.parent / "shared/data",
        help="folder holding harmless_train.json (not vendored)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model_dir = ensure_default_model(Settings().cache_dir)
    sources = {  # the dev sets of docs/patch-results.md
        ("advbench-dev-cyber", "harmful"): f"{ADVBENCH}?match=cyber&limit=45",
        ("advbench-dev-other", "harmful"): f"{ADVBENCH}?exclude=cyber&limit=45",
        ("harmless-dev", "benign"): f"{args.data_dir / 'harmless_train.json'}?limit=50",
        ("xstest-safe-dev", "benign"): f"{XSTEST}?where=label:safe&limit=50",
    }
    sets = [
        PromptSet(name, kind, load_prompts(parse_source(spec, split="dev")))  # type: ignore[arg-type]
        for (name, kind), spec in sources.items()
    ]
    configs = [EvalConfig(BASE, None), EvalConfig(args.adapter.name, args.adapter)]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(args.adapter)).eval()
    judge, entries = default_judge(), []
    for prompt_set in sets:
        with model.disable_adapter():
            base_out = hf_generate(model, tokenizer, prompt_set.prompts, args.max_tokens)
        outputs = {
            BASE: base_out,
            configs[1].name: hf_generate(model, tokenizer, prompt_set.prompts, args.max_tokens),
        }
        kls = (
            mean_kls(model_dir, configs, prompt_set.prompts, base_out.token_ids)
            if prompt_set.kind == "benign"
            else {}
        )
        entries += [
            score_entry(c.name, prompt_set, outputs[c.name], base_out, judge, kls.get(c.name))
            for c in configs
        ]
    report = build_report(entries, model=str(model_dir), engine="transformers+peft fp32")
    print(format_table(report))
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()

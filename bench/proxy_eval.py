"""Fast HF + peft proxy of `safepatch eval` for training ablations (docs/patch-results.md).

The same prompt sets (`app.factory.sets.build_sets`: options paired by position, whole files
unless a patch trained on them), judge, scoring (`score_entry`), source marking
(`mark_sources`) and KL (`prompt_kls`) as the shipped evaluation; only generation differs:
transformers in fp32 instead of vLLM (greedy tokens match vLLM's in fp32), which on a busy
shared CPU is several times faster than the CPU engine with LoRA. Prints the evaluation's table
and, with --json, writes its report. Without --prompts it scores the dev sets of
docs/patch-results.md (AdvBench cyber / other, harmless, XSTest-safe).

    .venv/bin/python -m bench.proxy_eval adapters/refusal-general /tmp/candidate \\
        --prompts multijail_en.csv?limit=25 --kind harmful --json /tmp/report.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from app.config import Settings
from app.factory.evaluate import BASE, EvalConfig, Outputs, mark_sources, prompt_kls, score_entry
from app.factory.gating import PromptKL
from app.factory.judge import default_judge
from app.factory.preserve import greedy_targets
from app.factory.report import build_report, format_table, write_json
from app.factory.sets import build_sets, patch_trainings, trained_files
from app.model.default_model import resolve_model_dir

DEV_SETS = [  # the dev sets of docs/patch-results.md: (spec, kind)
    ("advbench_harmful_behaviors.csv?match=cyber&limit=45&name=advbench-dev-cyber", "harmful"),
    ("advbench_harmful_behaviors.csv?exclude=cyber&limit=45&name=advbench-dev-other", "harmful"),
    ("harmless_train.json?limit=50&name=harmless-dev", "benign"),
    ("xstest_prompts.csv?where=label:safe&limit=50&name=xstest-safe-dev", "benign"),
]


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
    parser.add_argument("adapters", type=Path, nargs="+", help="PEFT adapter directories")
    parser.add_argument("--prompts", action="append", help="as safepatch eval --prompts")
    parser.add_argument("--kind", action="append", help="as safepatch eval --kind")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--no-kl", action="store_true", help="skip the KL pass")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(Settings())
    specs = args.prompts or [spec for spec, _ in DEV_SETS]
    kinds = args.kind if args.prompts else [kind for _, kind in DEV_SETS]
    trainings = patch_trainings(args.adapters)
    sets = build_sets(
        specs,
        columns=None,
        kinds=kinds,
        split="dev" if not args.prompts else None,
        limit=None,
        training_files=trained_files(trainings.values()),
    )
    configs = [EvalConfig(BASE, None)] + [
        EvalConfig(path.name, path, ((path.name, path),)) for path in args.adapters
    ]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(args.adapters[0]), adapter_name="a0").eval()
    for i, path in enumerate(args.adapters[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    judge, entries = default_judge(), []
    for prompt_set in sets:
        with model.disable_adapter():
            outputs = {BASE: hf_generate(model, tokenizer, prompt_set.prompts, args.max_tokens)}
        for i, config in enumerate(configs[1:]):
            model.set_adapter(f"a{i}")
            outputs[config.name] = hf_generate(
                model, tokenizer, prompt_set.prompts, args.max_tokens
            )
        kls = (
            prompt_kls(model_dir, configs, prompt_set.prompts, outputs[BASE].token_ids)
            if prompt_set.kind == "benign" and not args.no_kl
            else {}
        )
        entries += [
            score_entry(
                c.name, prompt_set, outputs[c.name], outputs[BASE], judge, _mean(kls.get(c.name))
            )
            | {"responses": outputs[c.name].texts}
            for c in configs
        ]
    mark_sources(entries, configs, sets)
    report = build_report(
        entries,
        model=str(model_dir),
        engine="transformers+peft fp32",
        judge=judge.name,
        max_tokens=args.max_tokens,
    )
    print(format_table(report))
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()


def _mean(kl: PromptKL | None) -> float | None:
    return kl.mean() if kl is not None else None

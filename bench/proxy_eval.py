"""Fast HF + peft proxy of `safepatch eval` for training ablations (docs/patch-results.md).

Same dev sets, judge and 32 greedy tokens as the shipped evaluation, but through transformers
in fp32 instead of vLLM (greedy tokens match vLLM's exactly in fp32), about 2 minutes per
adapter on 2 cores. Prints one JSON line: per set, the refusal rate, the share of answers
token-identical to the base model's, and (benign sets) the mean KL(base ‖ patched) over the
base answer's positions.

    .venv/bin/python -m bench.proxy_eval ~/.cache/safepatch/experiments/c1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from app.config import Settings
from app.factory.data import load_prompts, parse_source
from app.factory.judge import KeywordJudge
from app.factory.preserve import full_kl, pad_batch, response_logprobs
from app.factory.train import TrainConfig, _cached_targets
from app.model.default_model import ensure_default_model

REPO = Path(__file__).resolve().parents[1]
ADVBENCH = REPO / "app/factory/data/advbench_harmful_behaviors.csv"
HARMFUL_SETS = {
    "cyber": f"{ADVBENCH}?match=cyber&limit=45",
    "other": f"{ADVBENCH}?exclude=cyber&limit=45",
}
BATCH = 16


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
    args = parser.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    settings = Settings()
    model_dir = ensure_default_model(settings.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sets = {
        "harmless": f"{args.data_dir / 'harmless_train.json'}?limit=50",
        "xstest": f"{REPO}/app/factory/data/xstest_prompts.csv?where=label:safe&limit=50",
        **HARMFUL_SETS,
    }
    prompts = {k: load_prompts(parse_source(v, split="dev")) for k, v in sets.items()}
    config = TrainConfig(
        model_dir=model_dir,
        out_dir=Path("/nonexistent"),
        name="proxy",
        harmful=[],
        cache_dir=settings.cache_dir,
    )
    targets = {k: _cached_targets(config, base, tokenizer, v) for k, v in prompts.items()}
    model = PeftModel.from_pretrained(base, str(args.adapter)).eval()
    judge, eos = KeywordJudge(), tokenizer.eos_token_id
    started, result = time.monotonic(), {}
    with torch.no_grad():
        for name, set_targets in targets.items():
            refused = unchanged = 0
            kls: list[torch.Tensor] = []
            for i in range(0, len(set_targets), BATCH):
                batch = set_targets[i : i + BATCH]
                ids, mask = pad_batch([t.prompt_ids for t in batch], eos, left=True)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=32,
                    do_sample=False,
                    pad_token_id=eos,
                    eos_token_id=eos,
                )
                for row, target in zip(out, batch, strict=True):
                    tokens = row[ids.shape[1] :].tolist()
                    tokens = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
                    refused += judge.is_refusal(
                        "", tokenizer.decode(tokens, skip_special_tokens=True)
                    )
                    unchanged += tokens == target.response_ids
                if name not in HARMFUL_SETS:  # KL over the base's own answer positions
                    pair = ([t.prompt_ids for t in batch], [t.response_ids for t in batch], eos)
                    patched = response_logprobs(model, *pair)
                    with model.disable_adapter():
                        base_lps = response_logprobs(model, *pair)
                    kls += [full_kl(b, p) for b, p in zip(base_lps, patched, strict=True)]
            result[name] = {
                "n": len(set_targets),
                "refusal": refused / len(set_targets),
                "unchanged": unchanged / len(set_targets),
                "kl": float(torch.cat(kls).mean()) if kls else None,
            }
    print(
        json.dumps(
            {"adapter": str(args.adapter), **result, "seconds": round(time.monotonic() - started)}
        )
    )


if __name__ == "__main__":
    main()

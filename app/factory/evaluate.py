"""Safety evaluation through the real vLLM engine.

Every configuration (the base model, each patch, each stack of patches) answers every prompt
set greedily (temperature 0, `max_tokens`) in one offline `vllm.LLM`, with prompts tokenised by
the base tokenizer's chat template exactly as in training. Per configuration × set:

* `refusal_rate` — share of responses the judge (`app.factory.judge`) calls refusals; on
  harmful sets that is the refusal rate, on benign sets the over-refusal rate;
* benign sets only: `unchanged_rate` — share of responses whose token ids equal the base
  model's greedy response; `mean_kl` — KL(base ‖ config) of the next-token distributions,
  teacher-forced on the base's greedy response, averaged over all response positions of the set
  (token-weighted), computed with transformers + peft on the full vocabulary.

Patched configurations are scored per mode: `always` (the LoRA on every request) and `gated`,
derived from the same pass (`app.factory.gating`), with each patch's gate calibrated on the
sets it never trained on (`app.factory.calibrate`). Scoring is in `app.factory.scoring`.
Stacks are built with `app.patches.stacking.combine_adapters` (exact rank concatenation).
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from app.config import Settings
from app.factory.gating import Outputs, PromptKL
from app.factory.judge import RefusalJudge, default_judge
from app.factory.preserve import chat_prompt_ids, full_kl, response_logprobs
from app.factory.scoring import (
    BASE,
    Collected,
    EvalConfig,
    EvalRun,
    mark_sources,
    resolve_gates,
    score_all,
    score_entry,
)
from app.factory.sets import PromptSet
from app.patches.gate import MODES, Mode

__all__ = [
    "BASE",
    "EvalConfig",
    "EvalRun",
    "Outputs",
    "evaluate",
    "mark_sources",
    "prompt_kls",
    "score_entry",
]


def resolve_patch(name_or_path: str, adapters_dir: Path) -> tuple[str, Path]:
    """A patch name in `adapters_dir`, or a path to an adapter directory."""
    candidate = Path(name_or_path)
    if ("/" in name_or_path or name_or_path.startswith(".")) and candidate.is_dir():
        return candidate.resolve().name, candidate.resolve()
    path = adapters_dir / name_or_path
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no patch {name_or_path!r} in {adapters_dir}")
    return name_or_path, path


def build_configs(
    patches: Sequence[str], stacks: Sequence[str], adapters_dir: Path, work_dir: Path
) -> list[EvalConfig]:
    """Base first, then each patch, then each stack ('a+b' -> one combined adapter)."""
    configs = [EvalConfig(BASE, None)]
    for item in patches:
        name, path = resolve_patch(item, adapters_dir)
        configs.append(EvalConfig(name, path, ((name, path),)))
    for stack in stacks:
        members = [resolve_patch(part, adapters_dir) for part in stack.split("+") if part]
        if len(members) < 2:
            raise ValueError(f"a stack needs at least two patches: {stack!r}")
        from app.patches.stacking import combine_adapters  # lazy: optional piece

        name = "+".join(n for n, _ in members)
        out = combine_adapters([p for _, p in members], work_dir / f"stack-{len(configs)}")
        configs.append(EvalConfig(name, Path(out), tuple(members)))
    if len({c.name for c in configs}) != len(configs):
        raise ValueError("configuration names must be unique")
    return configs


def stored_patches(configs: Sequence[EvalConfig]) -> dict[str, Path]:
    """Name -> directory of every stored patch the run used, stack members included: a stack's
    result is stored with each member, since it is stale once a member changes."""
    return dict(pair for c in configs for pair in c.patch_dirs)


def generate(
    model_dir: Path,
    configs: Sequence[EvalConfig],
    sets: Sequence[PromptSet],
    max_tokens: int,
    settings: Settings,
) -> dict[tuple[str, str], Outputs]:
    """Greedy responses of every configuration on every set, through one vLLM engine."""
    from transformers import AutoTokenizer

    from app.engine.args import engine_kwargs, prepare_environment

    # Offline evaluation on a busy CPU can take minutes per step; vLLM's default 300 s step
    # timeout would kill the engine mid-run.
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
    prepare_environment(settings)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    flat = [(s.name, p) for s in sets for p in s.prompts]
    inputs = [TokensPrompt(prompt_token_ids=chat_prompt_ids(tokenizer, p)) for _, p in flat]
    kwargs = engine_kwargs(settings, model_dir)
    ranks = [_adapter_rank(c.adapter_dir) for c in configs if c.adapter_dir is not None]
    # Size the LoRA slots to the adapters evaluated: vLLM pads every slot to max_lora_rank, and
    # the CPU LoRA ops gather the padded factors per token, so rank 64 slots for rank-8 patches
    # cost ~8x the memory traffic.
    needed = max(ranks, default=8)
    kwargs["max_lora_rank"] = next((r for r in (8, 16, 32, 64, 128, 256) if r >= needed), needed)
    limit = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    if limit:  # small test models have short contexts
        kwargs["max_model_len"] = min(kwargs["max_model_len"], int(limit))
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=settings.seed)
    results: dict[tuple[str, str], Outputs] = {}
    try:
        for lora_id, config in enumerate(configs):
            request = (
                None
                if config.adapter_dir is None
                else LoRARequest(config.name, lora_id, str(config.adapter_dir))
            )
            outputs = llm.generate(inputs, params, lora_request=request, use_tqdm=True)
            for (set_name, _), out in zip(flat, outputs, strict=True):
                slot = results.setdefault((config.name, set_name), Outputs([], []))
                slot.token_ids.append(list(out.outputs[0].token_ids))
                slot.texts.append(out.outputs[0].text)
    finally:
        del llm
        gc.collect()
    return results


def _adapter_rank(adapter_dir: Path) -> int:
    return int(json.loads((adapter_dir / "adapter_config.json").read_text())["r"])


@torch.no_grad()
def prompt_kls(
    model_dir: Path,
    configs: Sequence[EvalConfig],
    prompts: Sequence[str],
    base_responses: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
) -> dict[str, PromptKL]:
    """Per prompt: Σ_t KL(base ‖ config) over the base's greedy response (full vocabulary),
    teacher-forced, and the response's length. `PromptKL.mean()` is the token-weighted mean."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    patched = [c for c in configs if c.adapter_dir is not None]
    sums = {c.name: [0.0] * len(prompts) for c in configs}
    if patched:
        model = PeftModel.from_pretrained(
            model, str(patched[0].adapter_dir), adapter_name=_slot(0)
        ).eval()
        for i, config in enumerate(patched[1:], start=1):
            model.load_adapter(str(config.adapter_dir), adapter_name=_slot(i))
    keep = [i for i, r in enumerate(base_responses) if len(r) > 0]
    for start in tqdm(range(0, len(keep), batch_size), desc="KL(base || patched)", unit="batch"):
        rows = keep[start : start + batch_size]
        prompt_ids = [chat_prompt_ids(tokenizer, prompts[i]) for i in rows]
        responses = [list(base_responses[i]) for i in rows]
        if patched:
            with model.disable_adapter():
                base_lp = response_logprobs(model, prompt_ids, responses, pad)
        else:
            base_lp = response_logprobs(model, prompt_ids, responses, pad)
        for i, config in enumerate(patched):
            model.set_adapter(_slot(i))
            lps = response_logprobs(model, prompt_ids, responses, pad)
            for row, b, p in zip(rows, base_lp, lps, strict=True):
                sums[config.name][row] = float(full_kl(b, p).sum())
    counts = [len(r) for r in base_responses]
    return {name: PromptKL(values, counts) for name, values in sums.items()}


def _slot(index: int) -> str:
    return f"cfg{index}"


def collect(
    model_dir: Path,
    configs: Sequence[EvalConfig],
    sets: Sequence[PromptSet],
    *,
    max_tokens: int,
    settings: Settings,
    kl_batch_size: int = 8,
) -> Collected:
    """One engine pass for every configuration × set, then per-prompt KL on the benign sets."""
    from transformers import AutoTokenizer

    outputs = generate(model_dir, configs, sets, max_tokens, settings)
    kls = {
        s.name: prompt_kls(
            model_dir,
            configs,
            s.prompts,
            outputs[(BASE, s.name)].token_ids,
            batch_size=kl_batch_size,
        )
        for s in sets
        if s.kind == "benign"
    }
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return Collected(
        outputs, kls, lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)
    )


def evaluate(
    model_dir: Path,
    configs: Sequence[EvalConfig],
    sets: Sequence[PromptSet],
    *,
    modes: Sequence[Mode] = MODES,
    calibrate: bool = True,
    max_tokens: int = 32,
    settings: Settings | None = None,
    judge: RefusalJudge | None = None,
    kl_batch_size: int = 8,
) -> EvalRun:
    """Run everything: report entries (configuration × set × mode) and the gates (calibrated
    where `calibrate`, see `app.factory.calibrate`)."""
    judge = judge or default_judge()
    collected = collect(
        model_dir,
        configs,
        sets,
        max_tokens=max_tokens,
        settings=settings or Settings(),
        kl_batch_size=kl_batch_size,
    )
    gates = resolve_gates(configs, sets, collected, judge, calibrate=calibrate)
    return EvalRun(score_all(configs, sets, collected, gates, modes, judge), gates)


def temp_work_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="safepatch-eval-")

"""Where LoRA serving time goes: py-spy samples of vLLM's CPU worker, before and after.

Starts `vllm serve` (vLLM's OpenAI server) with the two shipped patches, once with vLLM's own
CPU LoRA ops (`SAFEPATCH_CPU_LORA_FIX=0`) and once with safepatch's grouped ops, and while
`vllm.benchmarks.serve` sends two-patch round-robin traffic, `py-spy record` samples the
process that runs the model. Two phases: `decode` (32 in / 128 out, 16 concurrent: almost
only decode steps) and `prefill` (512 in / 1 out: only prefill). Every sample is put in one
bucket by the frames on its stack:

- lora:    CPU LoRA ops (vLLM's punica wrapper / torch ops, or app/engine/cpu_lora_*.py);
- linear:  the base model's matmuls (vLLM's linear layers' `apply`, the LM head);
- attention, sampler: vLLM's CPU attention backend, the sampler;
- other:   everything else (model Python, scheduling, input preparation, idle waits).

    PYTHONPATH=. .venv/bin/python -m bench.lora_profile [--seconds 20]
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from app.config import REPO_ROOT
from bench.lora_serve import PATCHES, RESULTS, default_model_dir, run_client, start, stop

PHASES = {"decode": ((32, 128), 16), "prefill": ((512, 1), 16)}  # lengths, prompts
BUCKETS = {  # first match wins, checked from the innermost frame outwards
    "lora": ("cpu_lora_ops.py", "cpu_lora_fix.py", "punica_", "torch_ops/lora_ops.py"),
    "linear": ("onednn_mm", "weight_packed_linear", "layers/utils.py", "layers/linear.py")
    + ("logits_processor.py",),
    "attention": ("attention/backends", "cpu_attn"),
    "sampler": ("sample/", "sampler.py"),
}


def _bucket(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for bucket, needles in BUCKETS.items():
            if any(needle in frame for needle in needles):
                return bucket
    return "other"


def _model_process(server_pid: int) -> int:
    """The descendant that runs the model: the one using the most CPU so far."""
    out = subprocess.run(
        ["ps", "-e", "-o", "pid=,ppid=,time="], capture_output=True, text=True, check=True
    ).stdout
    children: dict[int, list[int]] = collections.defaultdict(list)
    cpu: dict[int, int] = {}
    for line in out.splitlines():
        pid, ppid, used = line.split()
        children[int(ppid)].append(int(pid))
        parts = [int(p) for p in used.replace("-", ":").split(":")]
        cpu[int(pid)] = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    todo, found = [server_pid], []
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children[pid])
    return max(found[1:] or found, key=lambda pid: cpu.get(pid, 0))


def profile_phase(pid: int, base_url: str, model_dir: Path, phase: str, seconds: int) -> dict:
    lengths, prompts = PHASES[phase]
    with tempfile.NamedTemporaryFile(suffix=".txt") as raw:
        done = threading.Event()

        # Traffic from before the recording starts until it ends (the client's imports, its
        # dataset and its one-prompt test run come first and are not sampled).
        def traffic() -> None:
            while not done.is_set():
                run_client(base_url, model_dir, lengths, list(PATCHES), prompts)

        client = threading.Thread(target=traffic, daemon=True)
        client.start()
        time.sleep(15)
        subprocess.run(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid)]
            + ["--duration", str(seconds), "--rate", "50", "--format", "raw"]
            + ["--output", raw.name, "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        done.set()
        client.join()
        counts: collections.Counter[str] = collections.Counter()
        for line in Path(raw.name).read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack:  # py-spy leaves idle samples out (no --idle)
                counts[_bucket(stack)] += int(count)
        total = sum(counts.values()) or 1
    return {bucket: counts[bucket] / total for bucket in (*BUCKETS, "other")} | {"samples": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20)
    args = parser.parse_args()
    model_dir = default_model_dir()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, server in (("before", "vllm-unpatched"), ("after", "vllm")):
            process, base_url = start(server, model_dir, REPO_ROOT / "adapters", Path(tmp))
            try:
                pid = _model_process(process.pid)
                results[label] = {
                    phase: profile_phase(pid, base_url, model_dir, phase, args.seconds)
                    for phase in PHASES
                }
            finally:
                stop(process)
            print(label, json.dumps(results[label]), flush=True)
    print(f"{'':7} {'phase':8} " + " ".join(f"{b:>9}" for b in (*BUCKETS, "other")))
    for label, phases in results.items():
        for phase, shares in phases.items():
            print(
                f"{label:7} {phase:8} "
                + " ".join(f"{100 * shares[b]:8.0f}%" for b in (*BUCKETS, "other"))
            )
    (RESULTS / "lora_profile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""LoRA vs base throughput of `safepatch serve` and `vllm serve`, measured by vLLM's own client.

Each server is started in turn (never two at once), on SmolLM2-135M-Instruct fp32 with the two
shipped patches, and `vllm.benchmarks.serve` (random dataset, fixed lengths, `--ignore-eos`,
LoRA round robin) runs every scenario against it:

- base:  model = the base model;
- one:   every request names `refusal-general`;
- two:   `refusal-general` and `cyber` round robin;
- stack: `refusal-general+cyber` (safepatch only; `vllm serve` has no stacks).

Workloads: `prefill` (128 in / 48 out) and `decode` (32 in / 256 out), concurrency 16.
Servers: `safepatch` (`safepatch serve`, dev mode), `vllm` (vLLM's OpenAI server; the
safepatch plugin is active in it too, through its `vllm.general_plugins` entry point) and
`vllm-unpatched` (the same with `SAFEPATCH_CPU_LORA_FIX=0`: vLLM's own CPU LoRA ops).
Before each server, a fp32 GEMM microbenchmark gives the machine's roof in model tok/s.
Prints a table, writes JSON and a PNG. Quote ratios: the CPU is shared.

    PYTHONPATH=. .venv/bin/python -m bench.lora_serve [--servers safepatch vllm]
        [--workloads prefill decode] [--prefill-prompts 48] [--decode-prompts 16]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from app.config import REPO_ROOT
from bench.lora_roof import gemm_gflops, model_gflop_per_token

MODEL_NAME = "SmolLM2-135M-Instruct"
PATCHES = ("refusal-general", "cyber")
SCENARIOS = {  # name: LoRA module names for the client (None: base)
    "base": None,
    "one": ["refusal-general"],
    "two": ["refusal-general", "cyber"],
    "stack": ["refusal-general+cyber"],
}
WORKLOADS = {"prefill": (128, 48), "decode": (32, 256)}  # input, output tokens
CONCURRENCY = 16
ENGINE = {  # the same engine settings for both servers (safepatch's defaults)
    "max_model_len": 2048,
    "max_num_seqs": 64,
    "max_loras": 4,
    "max_lora_rank": 16,
}
RESULTS = Path(__file__).parent / "results"


def default_model_dir() -> Path:
    from app.model.default_model import ensure_default_model

    return ensure_default_model(Path("~/.cache/safepatch").expanduser())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(server: str, model_dir: Path, adapters: Path, port: int) -> list[str]:
    if server == "safepatch":
        return [str(Path(sys.executable).parent / "safepatch"), "serve", "--port", str(port)]
    modules = [f"{name}={adapters / name}" for name in PATCHES]
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        MODEL_NAME,
        "--dtype",
        "float32",
        "--port",
        str(port),
        "--enable-lora",
        "--lora-modules",
        *modules,
        "--max-model-len",
        str(ENGINE["max_model_len"]),
        "--max-num-seqs",
        str(ENGINE["max_num_seqs"]),
        "--max-loras",
        str(ENGINE["max_loras"]),
        "--max-lora-rank",
        str(ENGINE["max_lora_rank"]),
        "--enforce-eager",
    ]


def server_env(server: str, model_dir: Path, adapters: Path, workdir: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),  # safepatch's plugin and app from this checkout
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "OMP_NUM_THREADS": str(os.cpu_count() or 1),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if server == "vllm-unpatched":
        env["SAFEPATCH_CPU_LORA_FIX"] = "0"
    if server == "safepatch":
        env |= {
            "SAFEPATCH_DEV_MODE": "1",
            "SAFEPATCH_MODEL": str(model_dir),
            "SAFEPATCH_SERVED_MODEL_NAME": MODEL_NAME,
            "SAFEPATCH_ADAPTERS_DIR": str(adapters),
            "SAFEPATCH_CACHE_DIR": str(workdir / "cache"),
            "SAFEPATCH_DATABASE_URL": f"sqlite:///{workdir / 'safepatch.db'}",
            "SAFEPATCH_LOG_LEVEL": "WARNING",
        } | {f"SAFEPATCH_{key.upper()}": str(value) for key, value in ENGINE.items()}
    return env


def start(
    server: str,
    model_dir: Path,
    adapters: Path,
    workdir: Path,
    extra_env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> tuple[Any, str]:
    port = _free_port()
    log = (workdir / f"{server}.log").open("w")
    process = subprocess.Popen(
        server_command(server, model_dir, adapters, port) + (extra_args or []),
        env=server_env(server, model_dir, adapters, workdir) | (extra_env or {}),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    # safepatch answers /v1/models before its engine is up; /ready waits for the engine.
    ready_url = f"{base_url}/ready" if server == "safepatch" else f"{base_url}/v1/models"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{server} exited:\n{(workdir / f'{server}.log').read_text()[-3000:]}"
            )
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return process, base_url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(process)
    raise RuntimeError(f"{server} not ready in 600 s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_client(
    base_url: str,
    model_dir: Path,
    lengths: tuple[int, int],
    loras: list[str] | None,
    prompts: int,
) -> dict[str, float]:
    """One `vllm.benchmarks.serve` run (input, output `lengths`); returns headline metrics."""
    from vllm.benchmarks import serve as vllm_bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    vllm_bench.add_cli_args(parser)
    input_len, output_len = lengths
    argv = ["--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions"]
    argv += ["--model", MODEL_NAME, "--tokenizer", str(model_dir), "--dataset-name", "random"]
    argv += ["--random-input-len", str(input_len), "--random-output-len", str(output_len)]
    argv += ["--num-prompts", str(prompts), "--max-concurrency", str(CONCURRENCY)]
    argv += ["--ignore-eos", "--temperature", "0", "--seed", "0", "--disable-tqdm"]
    argv += ["--percentile-metrics", "ttft,tpot,e2el"]
    if loras:
        argv += ["--lora-modules", *loras, "--lora-assignment", "round-robin"]
    result = vllm_bench.main(parser.parse_args(argv))
    if result["completed"] != prompts:
        raise RuntimeError(f"{result['completed']}/{prompts} requests completed")
    keys = ("output_throughput", "total_token_throughput", "median_ttft_ms", "median_tpot_ms")
    return {key: float(result[key]) for key in keys}


def summarize(results: dict[str, Any]) -> list[str]:
    """Table rows with LoRA/base ratios and total tok/s as a share of the roof."""
    lines = [
        f"{'server':15} {'workload':8} {'scenario':8} {'out tok/s':>9} {'total tok/s':>11} "
        f"{'TTFT ms':>8} {'TPOT ms':>8} {'out/base':>8} {'TTFT/base':>9} {'% roof':>7}"
    ]
    for server, entry in results["servers"].items():
        roof = entry["roof_tok_s"]
        for workload, scenarios in entry["workloads"].items():
            base = scenarios.get("base")
            for scenario, m in scenarios.items():
                ratio = m["output_throughput"] / base["output_throughput"] if base else float("nan")
                ttft = m["median_ttft_ms"] / base["median_ttft_ms"] if base else float("nan")
                lines.append(
                    f"{server:15} {workload:8} {scenario:8} {m['output_throughput']:9.1f} "
                    f"{m['total_token_throughput']:11.1f} {m['median_ttft_ms']:8.0f} "
                    f"{m['median_tpot_ms']:8.1f} {ratio:8.2f} {ttft:9.2f} "
                    f"{100 * m['total_token_throughput'] / roof:6.0f}%"
                )
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({w for e in results["servers"].values() for w in e["workloads"]})
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4), squeeze=False)
    servers = list(results["servers"])
    for ax, workload in zip(axes[0], workloads, strict=True):
        width = 0.8 / len(servers)
        for k, server in enumerate(servers):
            scenarios = results["servers"][server]["workloads"].get(workload, {})
            names = [s for s in SCENARIOS if s in scenarios]
            xs = [list(SCENARIOS).index(s) + k * width for s in names]
            ax.bar(xs, [scenarios[s]["output_throughput"] for s in names], width, label=server)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(SCENARIOS))], list(SCENARIOS))
        inp, out = WORKLOADS[workload]
        ax.set_title(f"{workload}: {inp} in / {out} out, concurrency {CONCURRENCY}")
        ax.set_ylabel("output tok/s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", nargs="+", default=["safepatch", "vllm"])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    parser.add_argument("--prefill-prompts", type=int, default=48)
    parser.add_argument("--decode-prompts", type=int, default=16)
    parser.add_argument("--adapters", type=Path, default=REPO_ROOT / "adapters")
    parser.add_argument("--out", default="lora_serve", help="results/<out>.json and .png")
    args = parser.parse_args()
    model_dir = default_model_dir()
    gflop = model_gflop_per_token(model_dir)
    prompts = {"prefill": args.prefill_prompts, "decode": args.decode_prompts}
    results: dict[str, Any] = {
        "model_gflop_per_token": gflop,
        "concurrency": CONCURRENCY,
        "workloads": {
            w: {"input": WORKLOADS[w][0], "output": WORKLOADS[w][1], "prompts": prompts[w]}
            for w in args.workloads
        },
        "servers": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for server in args.servers:
            gflops = gemm_gflops()
            entry = {
                "gemm_gflops": gflops,
                "roof_tok_s": gflops / gflop,
                "load_average_1min": os.getloadavg()[0],  # other tenants of the shared CPU
                "workloads": {},
            }
            results["servers"][server] = entry
            print(
                f"== {server}: GEMM {gflops:.1f} GFLOP/s -> roof {gflops / gflop:.0f} tok/s "
                f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
            )
            process, base_url = start(server, model_dir, args.adapters, Path(tmp))
            try:
                # Untimed warm-up, base and LoRA: the first requests after start-up are slower
                # (lazy initialisation, adapter loading), and would land on whichever
                # scenario happens to run first.
                for loras in (None, list(PATCHES)):
                    run_client(base_url, model_dir, (64, 16), loras, CONCURRENCY)
                for workload in args.workloads:
                    scenarios = entry["workloads"].setdefault(workload, {})
                    for scenario in args.scenarios:
                        if scenario == "stack" and server != "safepatch":
                            continue
                        scenarios[scenario] = run_client(
                            base_url,
                            model_dir,
                            WORKLOADS[workload],
                            SCENARIOS[scenario],
                            prompts[workload],
                        )
                        print(server, workload, scenario, scenarios[scenario], flush=True)
            finally:
                stop(process)
    lines = summarize(results)
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=1))
    plot(results, RESULTS / f"{args.out}.png")
    print(f"wrote {RESULTS / args.out}.json/.png")


if __name__ == "__main__":
    main()

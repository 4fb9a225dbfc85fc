"""Write any model agora can load (GGUF included) as a Hugging Face folder:
config.json, model.safetensors, generation_config.json and the tokenizer files.
Other servers (vLLM, transformers) can then load exactly the weights agora serves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from agora.models.catalog import resolve_model
from agora.models.loader import inspect_model, load_model

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "tokenizer.model", "added_tokens.json")  # fmt: skip


def export_hf_folder(model: str, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    path, _ = resolve_model(model)
    files = inspect_model(path)
    net = load_model(files, dtype, torch.device("cpu"), cpu_kernels=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    tied = bool(files.hf_config.get("tie_word_embeddings"))
    if tied:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; HF re-ties on load
    from safetensors.torch import save_file

    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = dict(files.hf_config)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if config["architectures"][0] == "Phi3ForCausalLM":  # its weights are split (q/k/v, gate/up): a Llama, or a
        windowed = bool(config.get("sliding_window"))  # Mistral where it has a sliding window, to transformers
        config.update(architectures=["MistralForCausalLM" if windowed else "LlamaForCausalLM"],
                      model_type="mistral" if windowed else "llama")  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = {"eos_token_id": files.eos_token_ids}
    if config.get("bos_token_id") is not None:
        gen["bos_token_id"] = config["bos_token_id"]
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if files.tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            src = Path(files.tokenizer_dir) / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
    return out

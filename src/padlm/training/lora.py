"""PAD's first stage: DPO with a LoRA on the backbone, through TRL's ``DPOTrainer``.

The prompts are preference-conditioned exactly as decoding renders them (chat template,
preference placed by ``placement``); the reference is the frozen base (adapter disabled).
This is GPU work at real scale (12-22 s per step on a 2-core CPU); on a CPU it is for tiny
runs and tests. It trains on the device the base model is on. The trained adapter is
reloaded under PersRM's adapter name so the result saves and loads like any PersRM with
``lora: true``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import tempfile
import time
from pathlib import Path

from padlm.core.models import LoadedModel
from padlm.core.persrm import ADAPTER_NAME
from padlm.core.prompting import as_messages, place_preference
from padlm.data.schema import load_rows
from padlm.data.splits import split_rows
from padlm.errors import PadlmError

log = logging.getLogger(__name__)


def preference_dataset(lm: LoadedModel, config) -> list[dict[str, str]]:
    """TRL's explicit-prompt format with the chat template already applied."""
    rows, _ = load_rows(config.data, strict=config.strict)
    train, _ = split_rows(rows, config.validation_fraction)
    holdout = set(config.holdout_dimensions)
    records = []
    for row in train:
        if row.dimension in holdout or (config.dimensions and
                                        row.dimension not in config.dimensions):
            continue
        messages = place_preference(as_messages(row.prompt), row.preference, config.placement)
        prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        records.append({"prompt": prompt, "chosen": row.chosen, "rejected": row.rejected})
    if not records:
        raise PadlmError("no training rows for the LoRA stage")
    return records


def train_lora(lm: LoadedModel, config):
    """Run the LoRA DPO stage on a copy of the base model; returns ``(backbone, info)`` where
    the backbone is a PEFT model whose adapter is named ``persrm``."""
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from trl import DPOConfig, DPOTrainer

    began = time.perf_counter()
    records = preference_dataset(lm, config)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory(prefix="padlm-lora-") as tmp:
        args = DPOConfig(
            output_dir=tmp, beta=config.head.beta, learning_rate=5e-5,
            max_steps=config.lora_steps, per_device_train_batch_size=2,
            gradient_accumulation_steps=1, logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=lm.device.type == "cpu", max_length=512, seed=config.head.seed,
            disable_tqdm=True,
        )
        trainer = DPOTrainer(model=copy.deepcopy(lm.model), args=args,
                             train_dataset=Dataset.from_list(records),
                             processing_class=lm.tokenizer, peft_config=lora)
        result = trainer.train()
        adapter_dir = Path(tmp) / "adapter"
        trainer.model.save_pretrained(str(adapter_dir))
        digest = hashlib.sha256()
        for path in sorted(adapter_dir.rglob("*.safetensors")):
            digest.update(path.read_bytes())
        backbone = PeftModel.from_pretrained(copy.deepcopy(lm.model), str(adapter_dir),
                                             adapter_name=ADAPTER_NAME).eval()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    info = {"lora": {"steps": config.lora_steps, "rank": config.lora_rank,
                     "pairs": len(records), "losses": losses,
                     "train_loss": float(result.training_loss),
                     "seconds": round(time.perf_counter() - began, 1)},
            "adapter_sha256": digest.hexdigest()}
    log.info("LoRA stage: %s", info["lora"])
    return backbone, info

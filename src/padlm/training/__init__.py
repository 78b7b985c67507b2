"""Training PersRMs: PAD's two stages, made runnable on a CPU.

``cache`` computes the frozen backbone's final hidden states of every chosen / rejected
response once (fp16 on disk, resumable); ``head`` trains the value head with DPO against the
base model on those states; ``lora`` runs PAD's first stage (DPO with a LoRA on the backbone,
through TRL) for GPUs and tiny CPU runs; ``pipeline`` runs them from a data file; ``configs``
holds their settings, torch-free, so ``padlm train`` generates its options from them. The
head recipe's search is ``scripts/persrm_ablation.py``.
"""

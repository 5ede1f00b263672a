"""The gradient engine: records in, per-example LoRA gradients out.

    records.py    read JSONL / JSON / Parquet / saved HF datasets; bad records reported with file and line
    normalise.py  chat, ShareGPT, Alpaca, prompt/completion → validated chat messages; stable ids
    tokenize.py   chat template (or a plain fallback), labels on assistant tokens only
    model.py      load a causal LM (hub id, folder, .gguf) and attach a seeded LoRA adapter
    grads.py      per-example LoRA gradients from one batched forward + backward
    warmup.py     the short LoRA warmup, one checkpoint (adapter + Adam state) per epoch
    device.py     device, dtypes and torchrun process groups
"""

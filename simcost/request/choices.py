"""The names the training entrances accept, in one place (the CLI's choices and the request's
checks read these; the module imports nothing, so the parser stays cheap to build)."""

PEFT_METHODS = ("full", "freeze", "lora", "dora", "qlora", "ia3", "bitfit", "ln_tuning",
                "prefix", "prompt", "adapter", "lst")
DTYPES = ("fp32", "bf16", "fp16", "fp8")
MIXED_PRECISIONS = ("none", "bf16", "fp16")
ATTENTIONS = ("eager", "sdpa", "flash")
OPTIMIZERS = ("adamw", "sgd", "adamw8bit", "mezo")
CHECKPOINTING = ("none", "full", "selective")
FRONTENDS = ("auto", "analytic", "traced")

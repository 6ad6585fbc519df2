"""PEFT methods as graph transforms, one module per method."""
from simcost.peft import adapter, bitfit, dora, freeze, full, ia3, ln_tuning, lora, lst, prefix, prompt, qlora  # noqa: F401
from simcost.peft.base import METHODS, apply_peft
from simcost.peft.spec import PeftSpec, from_adapter_config, from_peft_dict


def tokens_added(spec) -> int:
    """Tokens a method prepends to every sequence (prompt tuning)."""
    return prompt.tokens_added(spec) if spec.method == "prompt" else 0


__all__ = ["METHODS", "PeftSpec", "apply_peft", "from_adapter_config", "from_peft_dict", "tokens_added"]

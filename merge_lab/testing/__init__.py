"""Test helpers, public for plugin authors: tiny checkpoints and the strategy contract suite."""

from merge_lab.testing.contract import check_strategy
from merge_lab.testing.tiny import (
    ARCHITECTURES,
    CHAT_TEMPLATE,
    load_tensors,
    logits,
    make_checkpoint,
    save_tiny_tokenizer,
    tiny_config,
    write_recipe,
)

__all__ = ["ARCHITECTURES", "CHAT_TEMPLATE", "check_strategy", "load_tensors", "logits", "make_checkpoint",
           "save_tiny_tokenizer", "tiny_config", "write_recipe"]

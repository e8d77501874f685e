"""File IO: atomic writes, (sharded) safetensors checkpoints, the PEFT LoRA adapter format and the
encodings file.

This package knows nothing of graphs, passes or the model: it reads and writes plain dicts of
tensors, configs and paths, and may import only the foundation (errors, version, meta,
collectives) and :mod:`graphlora.quant`. Every file graphlora writes goes through
:mod:`graphlora.io.atomic`. Turning a ``LoraModel`` into these files and back
(``LoraModel.save_pretrained``, ``graphlora.load_adapter``, ``graphlora.load_quantized``) is
orchestration and lives above the model, in :mod:`graphlora.checkpoint`.
"""

from graphlora.io.atomic import atomic_directory, atomic_path, atomic_write, recover
from graphlora.io.peft_config import (
    ADAPTER_CONFIG_NAME,
    LoraModuleSpec,
    build_adapter_config,
    peft_selects,
    read_adapter_config,
    resolve_pattern,
    validate_adapter_config,
)
from graphlora.io.peft_format import (
    ADAPTER_LEGACY_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_KEY_PREFIX,
    LoraAdapter,
    LoraModule,
    check_adapter_shapes,
    check_shapes,
    lora_keys,
    lora_shapes,
    parse_lora_key,
    peft_lora_keys,
    read_adapter,
    save_adapter,
    write_adapter,
)
from graphlora.io.safetensors_io import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SavedWeights,
    load_state_dict,
    parse_size,
    plan_shards,
    read_safetensors,
    save_state_dict,
    write_json,
    write_safetensors,
    write_state_dict,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_LEGACY_WEIGHTS_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_KEY_PREFIX",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "LoraAdapter",
    "LoraModule",
    "LoraModuleSpec",
    "SavedWeights",
    "atomic_directory",
    "atomic_path",
    "atomic_write",
    "build_adapter_config",
    "check_adapter_shapes",
    "check_shapes",
    "load_state_dict",
    "lora_keys",
    "lora_shapes",
    "parse_lora_key",
    "parse_size",
    "peft_lora_keys",
    "peft_selects",
    "plan_shards",
    "read_adapter",
    "read_adapter_config",
    "read_safetensors",
    "recover",
    "resolve_pattern",
    "save_adapter",
    "save_state_dict",
    "validate_adapter_config",
    "write_adapter",
    "write_json",
    "write_safetensors",
    "write_state_dict",
]

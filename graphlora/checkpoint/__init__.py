"""Checkpoints of a LoraModel: saving it in the layouts Hugging Face users load, and loading PEFT
LoRA adapters and graphlora's keep-quantized saves back.

This is orchestration: it reads the model's graph, sites and adapters, runs passes (merging,
re-quantizing) and traces plain models, then hands plain tensors and configs to the file formats
of :mod:`graphlora.io`, which know nothing of graphs. ``LoraModel.save_pretrained`` and
``LoraModel.load_adapter`` call in here (the one import from the model up to this layer).

* :mod:`~graphlora.checkpoint.saving` — :func:`save_pretrained`: the three save options, each
  written all-or-nothing.
* :mod:`~graphlora.checkpoint.loading` — :func:`load_adapter`: checks, then installs an adapter.
* :mod:`~graphlora.checkpoint.quantized` — ``keep_quantized=True`` saves and :func:`load_quantized`.
* :mod:`~graphlora.checkpoint.adapter_state` — which adapter goes where, and as which PEFT modules.
* :mod:`~graphlora.checkpoint.layout` — the names inside a save directory.
"""

from graphlora.checkpoint.adapter_state import adapter_layout
from graphlora.checkpoint.layout import ADAPTERS_SUBDIR, CONFIG_NAME, resolve_adapter_dir
from graphlora.checkpoint.loading import load_adapter
from graphlora.checkpoint.quantized import load_quantized
from graphlora.checkpoint.saving import SaveResult, save_pretrained

__all__ = [
    "ADAPTERS_SUBDIR",
    "CONFIG_NAME",
    "SaveResult",
    "adapter_layout",
    "load_adapter",
    "load_quantized",
    "resolve_adapter_dir",
    "save_pretrained",
]

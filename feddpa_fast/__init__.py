"""feddpa_fast: fused dual-LoRA kernels for personalized federated fine-tuning (FedDPA & co).

The op lives in ``feddpa_fast.kernels`` (``lora_linear``). On top of it:

    import feddpa_fast as fd
    model = fd.patch(model, fd.DualLoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")))
    with fd.mix(model, global_w=torch.tensor([0.3, 0.5]), local_w=torch.tensor([0.7, 0.5])):
        logits = model(**batch).logits            # one fused op per layer, per-sequence mix
    fd.save_adapter(model, "out/global", adapter="global")   # PEFT's format
"""
__version__ = "0.1.0"

from .adapters import AdapterError, load_adapter, save_adapter
from .client_bank import add_client, client_names, remove_clients, save_client
from .client_training import ClientAdapters, client_adapters
from .config import ADAPTERS, DualLoRAConfig
from .layers import DualLoRALinear
from .mixing import mix, print_trainable, set_trainable
from .packing import packed_weights
from .patch import merge, patch, unmerge, unpatch
from .routing import LayerRouters, route

__all__ = ["ADAPTERS", "AdapterError", "ClientAdapters", "DualLoRAConfig", "DualLoRALinear",
           "LayerRouters", "add_client", "client_adapters", "client_names", "load_adapter",
           "merge", "mix", "packed_weights", "patch", "print_trainable", "remove_clients",
           "route", "save_adapter", "save_client", "set_trainable", "unmerge", "unpatch"]

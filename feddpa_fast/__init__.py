"""feddpa_fast: fused dual-LoRA kernels for personalized federated fine-tuning (FedDPA & co).

The op lives in ``feddpa_fast.kernels`` (``lora_linear``); the model patcher, the mixing API and
the federated trainer build on it.
"""
__version__ = "0.1.0"

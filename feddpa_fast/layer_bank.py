"""The client bank of a ``DualLoRALinear`` (docs/ARCHITECTURE.md §1): several clients'
adapters side by side, slot 0 the shared global, read by ``lora_linear_banked`` under
``mix(..., clients=...)``. ``feddpa_fast.client_bank`` fills it; the layer mixes this in."""
from __future__ import annotations

import torch

from . import rows
from .kernels import reference

__all__ = ["ClientBankMixin"]


class ClientBankMixin:
    """The bank's slots and operands; ``DualLoRALinear`` holds the state (``client_bank_a``,
    ``client_bank_b``, ``client_scaling``, ``client_slots``) and the scale cache."""

    def reset_client_bank(self) -> None:
        """A bank holding only slot 0: a copy of the global adapter."""
        a, b = self.lora_A["global"].weight.detach(), self.lora_B["global"].weight.detach()
        self.client_bank_a = a.clone().unsqueeze(0)
        self.client_bank_b = b.clone().unsqueeze(0)
        self.client_scaling = [self.scaling["global"]]

    def append_to_bank(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> int:
        """Appends one adapter ((r, K), (N, r)) to the bank; returns its slot."""
        bank_a, bank_b = self.client_bank_a, self.client_bank_b
        self.client_bank_a = torch.cat([bank_a, lora_a.to(bank_a).unsqueeze(0)])
        self.client_bank_b = torch.cat([bank_b, lora_b.to(bank_b).unsqueeze(0)])
        self.client_scaling.append(float(scaling))
        return len(self.client_scaling) - 1

    def refresh_shared_global(self) -> None:
        """Copies the global adapter (and its scaling) into slot 0 of the bank."""
        with torch.no_grad():
            self.client_bank_a[0].copy_(self.lora_A["global"].weight)
            self.client_bank_b[0].copy_(self.lora_B["global"].weight)
        self.client_scaling[0] = self.scaling["global"]

    def bank_adapter(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one slot of the bank."""
        return self.client_bank_a[slot], self.client_bank_b[slot]

    def drop_client_bank(self) -> None:
        """Frees the bank (``remove_clients`` of every client)."""
        self.client_bank_a = self.client_bank_b = None
        self.client_scaling = []

    def _banked_operands(self, x: torch.Tensor, clients: torch.Tensor):
        """(bank A, bank B, index, scale) for lora_linear_banked: each sequence's rows through
        its client's (global, local) slots of the bank, the mix weights times each slot's
        scaling per row. Index and scale are built once per input shape for the whole model
        (the ``_scale`` cache): every layer of a call sees the same rows and clients."""
        if self.source is not None:
            raise ValueError("mix(..., clients=...) cannot run with an attached adapter source")
        if self.client_routers is not None:  # per layer and with a graph: never cached
            index, scale = self._bank_index_scale(x, clients)
        else:
            key = ("bank", self.r["local"], tuple(self.client_scaling))
            index, scale = self._cached(x, key, lambda: self._bank_index_scale(x, clients))
        return self.client_bank_a, self.client_bank_b, index, scale

    def _bank_index_scale(self, x: torch.Tensor, clients: torch.Tensor):
        acc = reference.accum_dtype(x.dtype)
        call = self._mix_call.get("positions")
        index = rows.expand(clients.to(torch.float64).unsqueeze(1), x, ("clients",), (),
                            call).to(torch.int64)                            # (M, 2)
        weights = self.mix_weights
        if any(isinstance(w, torch.Tensor) and w.dim() for w in weights):
            per_row = self._per_row_weights(x, acc)
        else:
            per_row = torch.stack([torch.as_tensor(w, dtype=acc, device=x.device)
                                   for w in weights]).expand(index.shape[0], 2)
        if self.client_routers is not None:
            per_row = per_row * self._bank_routed(x, index, acc)
        scalings = torch.tensor(self.client_scaling, dtype=acc, device=x.device)[index]
        return index, (per_row * scalings).repeat_interleave(self.r["local"], dim=1)

    def _bank_routed(self, x: torch.Tensor, index: torch.Tensor, acc) -> torch.Tensor:
        """(M, 2): each row's softmax over its client's router (the router of its local slot,
        ``client_routers``), in fp32: every slot's logits in one (M, K) x (K, 2 slots) product,
        then each row's pair gathered (2 slots of 17 for 8 clients: a third of one rank-8 A)."""
        routers = self.client_routers
        with torch.autocast(x.device.type, enabled=False):
            logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).to(acc),
                                                routers.reshape(-1, routers.shape[-1]).to(acc))
        pairs = logits.view(logits.shape[0], -1, 2)
        mine = pairs[torch.arange(pairs.shape[0], device=x.device), index[:, 1]]
        return torch.softmax(mine, dim=-1)

"""The weight updates a LoRA-style file can hold, each rebuilt into a full ΔW for merging.

- ``LowRank`` — LoRA (Hu et al. 2021) and LoCon: ΔW = up @ down.
- ``Hadamard`` — LoHa (LyCORIS; Hyeon-Woo et al. 2022, FedPara): ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b), or with
  Tucker cores t1/t2 for convolutions (``hada_t1``/``hada_t2``).
- ``Kronecker`` — LoKr (LyCORIS; Yeh et al. 2023): ΔW = w1 ⊗ w2, each factor stored whole (``lokr_w1``) or
  as a low-rank pair (``lokr_w1_a``/``lokr_w1_b``), w2 optionally with a Tucker core (``lokr_t2``).

DoRA (Liu et al. 2024, weight-decomposed LoRA) is not an update of its own: a ``dora_scale`` beside any of
them rescales W + ΔW to the stored magnitudes (``apply_dora``).

The rebuilding formulas are LyCORIS's (and AUTOMATIC1111's ``extensions-builtin/Lora``, which PEFT's LoHa/LoKr
also follow): files from kohya's sd-scripts, LyCORIS and PEFT give the same ΔW here as in those tools.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _f32(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device, torch.float32)


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A Tucker (CP) product: core t (r, r, kh, kw), wa (r, out), wb (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t, wa, wb)


@dataclass(frozen=True)
class LowRank:
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def out_in(self) -> tuple[int, int]:
        return self.up.shape[0], self.down[0].numel()

    def fits(self) -> bool:
        return self.up.shape[1] == self.down.shape[0] and (self.up.ndim != 4 or self.up.shape[2:] == (1, 1))

    def delta(self, device) -> torch.Tensor:
        """(out, in·kh·kw): the caller reshapes it to the weight."""
        return _f32(self.up, device).flatten(1) @ _f32(self.down, device).flatten(1)


@dataclass(frozen=True)
class Hadamard:
    w1_a: torch.Tensor  # (out, rank), or (rank, out) with a Tucker core
    w1_b: torch.Tensor  # (rank, in·kh·kw), or (rank, in) with a Tucker core
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: torch.Tensor | None = None  # (rank, rank, kh, kw)
    t2: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    def out_in(self) -> tuple[int, int]:
        if self.t1 is not None:
            return self.w1_a.shape[1], self.w1_b.shape[1] * self.t1[0, 0].numel()
        return self.w1_a.shape[0], self.w1_b.shape[1]

    def fits(self) -> bool:
        return (self.t1 is None) == (self.t2 is None) and self.w1_a.shape == self.w2_a.shape and \
            self.w1_b.shape == self.w2_b.shape

    def delta(self, device) -> torch.Tensor:
        w1_a, w1_b, w2_a, w2_b = (_f32(t, device) for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b))
        if self.t1 is not None:
            return _cp(_f32(self.t1, device), w1_a, w1_b) * _cp(_f32(self.t2, device), w2_a, w2_b)
        return (w1_a @ w1_b) * (w2_a @ w2_b)


@dataclass(frozen=True)
class Kronecker:
    w1: torch.Tensor | None = None  # (a, b) whole, or
    w1_a: torch.Tensor | None = None  # (a, rank) @ w1_b (rank, b)
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None  # (c, d) or (c, d, kh, kw) whole, or
    w2_a: torch.Tensor | None = None  # (c, rank) @ w2_b (rank, d·kh·kw), or with t2: (rank, c), (rank, d)
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None  # (rank, rank, kh, kw)

    @property
    def rank(self) -> int | None:
        """The rank alpha divides by; None when both factors are stored whole (then alpha is not used)."""
        for low in (self.w1_b, self.w2_b):
            if low is not None:
                return low.shape[0]
        return None

    def _factors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = _f32(self.w1, device) if self.w1 is not None else _f32(self.w1_a, device) @ _f32(self.w1_b, device)
        if self.w2 is not None:
            w2 = _f32(self.w2, device)
        elif self.t2 is not None:
            w2 = _cp(_f32(self.t2, device), _f32(self.w2_a, device), _f32(self.w2_b, device))
        else:
            w2 = _f32(self.w2_a, device) @ _f32(self.w2_b, device)
        return w1, w2

    def out_in(self) -> tuple[int, int]:
        w1, w2 = self._factors("meta")
        return w1.shape[0] * w2.shape[0], w1.shape[1] * w2[0].numel()

    def fits(self) -> bool:
        return (self.w1 is None) != (self.w1_a is None) and (self.w2 is None) != (self.w2_a is None)

    def delta(self, device) -> torch.Tensor:
        w1, w2 = self._factors(device)
        if w2.ndim == 4:  # a convolution: w1 scales whole kernels
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous()).flatten(1)


WeightUpdate = LowRank | Hadamard | Kronecker


def apply_dora(weight: torch.Tensor, merged: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA: W + ΔW rescaled to the stored magnitudes. ``magnitude`` is shaped like a norm kept over the other
    dimensions: (out, 1, …) for a norm per output channel (PEFT; LyCORIS's default ``wd_on_out``) or
    (1, in, …) per input channel (older LyCORIS files, as AUTOMATIC1111 reads them). Returns the new ΔW."""
    magnitude = magnitude.to(merged.device, torch.float32)
    if magnitude.ndim == 1:  # PEFT's lora_magnitude_vector: one value per output channel
        magnitude = magnitude.reshape(-1, *[1] * (merged.ndim - 1))
    per_output = magnitude.shape[0] == merged.shape[0] and magnitude[0].numel() == 1
    dims = tuple(d for d in range(merged.ndim) if d != (0 if per_output else 1))
    norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True)
    return merged * (magnitude / norm) - weight

"""The memory model of a compute: what each part needs, from d, k_max, m, the batch size and the dtypes.

Written down in docs/design.md ("Memory and speed"); ``compute`` prints the plan before it starts and a test
checks the per-example gradient buffer against a measured peak. All sizes are bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """Peak sizes of the parts of a compute; ``device`` and ``host`` sum what is resident at the same time."""

    weights: int  # model weights, on the device
    lora: int  # LoRA weights and their gradients, on the device
    batch_grads: int  # per-example gradients of one batch, on the device
    basis: int  # the GIST basis d × k
    basis_on_device: bool  # else streamed from the host in row blocks
    val_grads: int  # validation gradients m × d
    val_grads_on_disk: bool  # beyond the host budget they are a disk memmap
    gram: int  # K = G Gᵀ and its eigenvectors, float64
    activations: int  # what the forward keeps for the backward, for --max-tokens padded tokens (an estimate)
    batch: int  # examples per gradient batch

    @property
    def device(self) -> int:
        """Device memory at the peak of a gradient batch: weights, LoRA, activations, the batch's gradients, the resident basis."""
        return self.weights + self.lora + self.activations + self.batch_grads + (self.basis if self.basis_on_device else 0)

    @property
    def host(self) -> int:
        """Host memory of the validation pass: G (unless on disk), the Gram matrix and the basis being fitted."""
        return (0 if self.val_grads_on_disk else self.val_grads) + self.gram + self.basis

    def describe(self) -> str:
        """One line for the terminal."""
        gb = lambda b: f"{b / GIB:.2f} GB"  # noqa: E731
        where = "device" if self.basis_on_device else "host, streamed"
        return (f"memory plan: batch ≤ {self.batch} examples; device ≤ {gb(self.device)} (weights {gb(self.weights)}, activations "
                f"≤ {gb(self.activations)} at --max-tokens, per-example gradients {gb(self.batch_grads)}, basis {gb(self.basis)} on the {where}); "
                f"host {gb(self.host)} "
                f"(validation gradients {gb(self.val_grads)}{' on disk' if self.val_grads_on_disk else ''})")  # fmt: skip


def activation_bytes(tokens: int, hidden: int, layers: int, modules: int, rank: int, act_bytes: int) -> int:
    """What the forward keeps for the backward: per token and layer about 16 × hidden values for the transformer
    block (a common rule of thumb) plus, per adapted module, its input and the rank-r LoRA activations."""
    return tokens * layers * (16 * hidden + modules * (hidden + 2 * rank)) * act_bytes


def plan(*, n_params: int, weight_bytes: int, d: int, k: int, m: int, batch: int, basis_bytes: int = 4, grad_memory: float = 4 * GIB,
         basis_memory: float = 16 * GIB, host_memory: float = 2 * GIB, activations: int = 0) -> MemoryPlan:  # fmt: skip
    """The plan for a model of ``n_params`` weights and d LoRA parameters (batch: the --max-batch before the memory bound)."""
    batch = max(1, min(batch, int(grad_memory // (d * 4))))
    basis = d * k * basis_bytes
    val_grads = m * d * 4
    return MemoryPlan(
        weights=n_params * weight_bytes, lora=2 * d * 4, batch_grads=batch * d * 4, basis=basis, basis_on_device=basis <= basis_memory,
        val_grads=val_grads, val_grads_on_disk=val_grads > host_memory, gram=2 * m * m * 8, activations=activations, batch=batch,
    )  # fmt: skip


def llama_lora_params(hidden: int, kv_dim: int, layers: int, rank: int) -> int:
    """d of a LoRA of rank ``rank`` on q, k, v, o of a Llama-style model (q, o: hidden → hidden; k, v: hidden → kv_dim)."""
    return layers * rank * (2 * (hidden + hidden) + 2 * (hidden + kv_dim))

"""Shared by the orthogonal families (OFT, BOFT, HRA): block-by-block rotations, the Cayley map,
real matrix powers, and the forward hooks their runtime twins use where a live PEFT layer's own
parameters cannot express a scheme.

Rotations are applied per block (a (rows, n·b) tensor times n blocks of b×b): a dense in×in
block-diagonal matrix is never built.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.hooks import RemovableHandle

from ..errors import SchemeError

# An eigenvalue counts as lying on the negative real axis when |Im λ| ≤ this × |λ|.
NEGATIVE_AXIS_TOLERANCE = 1e-9
HOOKS_ATTRIBUTE = "_weightsteer_hooks"
HookFactory = Callable[[torch.nn.Module], RemovableHandle]  # installs a hook on the module, returns its handle


def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x[..., block k] @ blocks[k] for each block of b columns of x; blocks is (n, b, b), or (1, b, b) shared by all."""
    shape = x.shape
    size = blocks.shape[-1]
    split = x.reshape(-1, shape[-1] // size, size).transpose(0, 1)
    return (split @ blocks.to(x.dtype)).transpose(0, 1).reshape(shape)


def cayley(matrices: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(I − A)(I + A)⁻¹ for a batch of square matrices (PEFT: `solve(I + A, I − A, left=False)`).

    The map is its own inverse. Returns (result, ok); ok is False when some I + A is singular.
    """
    eye = torch.eye(matrices.shape[-1], dtype=matrices.dtype, device=matrices.device).expand_as(matrices)
    result, info = torch.linalg.solve_ex(eye + matrices, eye - matrices, left=False)
    return result, bool((info == 0).all()) and bool(torch.isfinite(result).all())


def real_power(matrices: torch.Tensor, c: float, refusal: str) -> torch.Tensor:
    """The principal real power A^c of a batch of real matrices, in float64.

    Integer c: a plain matrix power (always defined for invertible A). Otherwise A = V diag(λ) V⁻¹ and
    A^c = V diag(λ^c) V⁻¹ with the principal λ^c, which is real exactly when no eigenvalue lies on the
    closed negative real axis; raises SchemeError(refusal) when one does.
    """
    matrices = matrices.double()
    if float(c).is_integer():
        return torch.linalg.matrix_power(matrices, int(c))
    values, vectors = torch.linalg.eig(matrices)
    on_negative_axis = (values.real <= 0) & (values.imag.abs() <= NEGATIVE_AXIS_TOLERANCE * values.abs())
    if on_negative_axis.any():
        raise SchemeError(refusal)
    powered = vectors @ torch.diag_embed(values**c) @ torch.linalg.inv(vectors)
    return powered.real


def replace_hook(module: torch.nn.Module, adapter: str, register: HookFactory | None) -> None:
    """Remove the hook weightsteer put on `module` for `adapter`, then install `register(module)` if given."""
    hooks: dict[str, RemovableHandle] = module.__dict__.setdefault(HOOKS_ATTRIBUTE, {})
    previous = hooks.pop(adapter, None)
    if previous is not None:
        previous.remove()
    if register is not None:
        hooks[adapter] = register(module)

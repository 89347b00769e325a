"""Compiling an offloaded model on a GPU smaller than the model: its experts stay in host memory.

An offloaded or expert-parallel artifact's graph reads no expert weight
(`passes.external_experts`): the runtime's pager streams them, or each rank loads its own. The
compiler needs them on the GPU only to check a lowered MoE block against the block it replaces
and to time the tuner's candidates, one block (one per MoE shape) at a time. So `keep_on_host` swaps every MoE block's expert weights for fake tensors on the target
device (same shape, dtype and strides, no memory: export traces them as it would the real ones)
and keeps the real tensors where they were loaded, in host memory; `HostExperts.on_device(paths)`
puts real copies of those blocks' experts in place for the body of a `with`, and `host` is what
`save_weights` writes under the same names. The GPU then holds the dense weights and one block's
experts, not the model (Mixtral-8x7B: 2.8 GB of experts a block, 47 GB for 16 layers). The
pipeline does this on a GPU that cannot hold the model, and always for the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from moec.compiler.passes.moe_region import MOE_BLOCKS

EXPERT_ROLES = ("gate_up_proj", "down_proj")


def is_stand_in(t: torch.Tensor) -> bool:
    """Whether `t` is one of `keep_on_host`'s fake expert weights (it holds no data)."""
    return isinstance(t, FakeTensor)


def expert_weights(model: nn.Module) -> dict[str, dict[str, tuple[nn.Module, str]]]:
    """{block path: {parameter FQN: (owning module, attribute)}} of every MoE block's experts."""
    out = {}
    for path, block in model.named_modules():
        spec = MOE_BLOCKS.get(type(block).__name__)
        if spec is None:
            continue
        out[path] = {}
        for role in EXPERT_ROLES:
            owner, attr = getattr(spec, role).rpartition(".")[::2]
            out[path][f"{path}.{getattr(spec, role)}"] = (block.get_submodule(owner) if owner else block, attr)
    return out


def _set(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


@dataclass
class HostExperts:
    """The real expert weights of a model whose parameters now hold stand-ins (`keep_on_host`)."""

    device: torch.device
    fake_mode: FakeTensorMode
    host: dict[str, torch.Tensor]  # parameter FQN -> the real tensor, in host memory
    blocks: dict[str, dict[str, tuple[nn.Module, str]]] = field(repr=False)

    def block_bytes(self, path: str) -> int:
        return sum(self.host[name].nbytes for name in self.blocks[path])

    @property
    def bytes(self) -> int:
        return sum(t.nbytes for t in self.host.values())

    @property
    def largest_block_bytes(self) -> int:
        return max((self.block_bytes(p) for p in self.blocks), default=0)

    def move_rest(self, model: nn.Module) -> nn.Module:
        """`model.to(device)` for everything but the stand-ins (a module move would try to swap
        them for copies of themselves, and fake tensors cannot be swapped)."""
        stand_ins = [(m, a, m._parameters.pop(a)) for names in self.blocks.values() for m, a in names.values()]
        try:
            return model.to(self.device)
        finally:
            for module, attr, stand_in in stand_ins:
                module._parameters[attr] = stand_in

    def hollow(self, ep: torch.export.ExportedProgram) -> None:
        """Replace the stand-ins in `ep`'s state dict (shared by the programs made from it) by real
        tensors of one element each, broadcast to the weights' shapes. For AOTInductor, which
        takes the state dict as real tensors: once the experts are external the graph does not
        read them, and no constant is compiled for them."""
        for name, real in self.host.items():
            if is_stand_in(ep.state_dict.get(name)):
                one = torch.zeros(1, dtype=real.dtype, device=self.device)
                ep.state_dict[name] = nn.Parameter(one.expand(real.shape), requires_grad=False)

    @contextmanager
    def on_device(self, paths: Iterable[str]) -> Iterator[None]:
        """Real copies of the experts of the blocks at `paths` on the device, stand-ins again after."""
        paths = list(dict.fromkeys(paths))
        placed = []
        try:
            for path in paths:
                for name, (module, attr) in self.blocks[path].items():
                    stand_in = module._parameters[attr]
                    _set(module, attr, self.host[name].to(self.device))
                    placed.append((module, attr, stand_in))
            yield
        finally:
            for module, attr, stand_in in reversed(placed):
                module._parameters[attr] = stand_in


def keep_on_host(model: nn.Module, device: str | torch.device) -> HostExperts:
    """Replace the expert weights of every MoE block of `model` (still in host memory, as loaded)
    by stand-ins on `device`; the real tensors are returned, not copied."""
    device = torch.device(device)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    blocks = expert_weights(model)
    host = {}
    for names in blocks.values():
        for name, (module, attr) in names.items():
            real = module._parameters[attr].detach()
            host[name] = real
            with fake_mode:
                stand_in = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=device)
            _set(module, attr, stand_in)
    return HostExperts(device, fake_mode, host, blocks)

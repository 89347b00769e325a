"""The expert executor of an expert-parallel artifact: this rank's experts, tokens moved by all-to-all.

Started as one process per rank (`torchrun --nproc-per-node N -m moec.runtime ...`, or anything
that initialises `torch.distributed` with N ranks). Each rank reads only its block of every MoE
layer's experts from the weights file (safetensors slices: no rank holds all of them) and runs
`moec.ops.expert_dispatch.ep_moe` for `moec::external_moe`. Attention and the dense layers are
data-parallel: each rank decodes its own share of the sequences, and the engine steps every rank
in lockstep so that each MoE layer's all-to-all finds all ranks there.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moec.artifact import Artifact
from moec.errors import ArtifactError
from moec.ops.expert_dispatch import ep_moe


def check_world(artifact: Artifact) -> tuple[int, int]:
    """(rank, world size) of this process, which must match the artifact's `ep`."""
    want = int(artifact.manifest.parallel["ep"])
    if not dist.is_available() or not dist.is_initialized():
        raise ArtifactError(f"artifact {artifact.manifest.name!r} is expert-parallel over {want} ranks: start it as "
                            f"{want} processes (torchrun --nproc-per-node {want} -m moec.runtime ...)")
    world = dist.get_world_size()
    if world != want:
        raise ArtifactError(f"artifact {artifact.manifest.name!r} was compiled for {want} ranks (parallel.ep) but "
                            f"started with {world}; start {want} processes or recompile with parallel.ep: {world}")
    return dist.get_rank(), world


class ExpertParallelExecutor:
    def __init__(self, artifact: Artifact, device: torch.device, rank: int, chunks: int | None = None):
        from safetensors import safe_open

        par = artifact.manifest.parallel
        mine = par["placement"][rank]
        lo, hi = mine[0], mine[-1] + 1
        self.num_experts = sum(len(p) for p in par["placement"])
        self.chunks = int(chunks or par.get("chunks", 1))
        self.placement = par["placement"]
        self.counting = True  # off for the idle steps an empty rank takes
        self.counts = torch.zeros(len(par["experts"]), self.num_experts, dtype=torch.int64, device=device)
        self.local = []
        with safe_open(artifact.weights_path, framework="pt", device=str(device)) as f:
            for entry in sorted(par["experts"], key=lambda e: e["layer"]):
                self.local.append((f.get_slice(entry["gate_up_proj"])[lo:hi].contiguous(),
                                   f.get_slice(entry["down_proj"])[lo:hi].contiguous()))

    def run(self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
            activation: str, plan: str) -> torch.Tensor:
        w13, w2 = self.local[layer]
        if self.counting:  # on the device: no sync; read by expert_load
            self.counts[layer] += torch.bincount(topk_ids.flatten(), minlength=self.num_experts)
        return ep_moe(hidden, topk_weights, topk_ids, w13, w2, self.num_experts, activation, chunks=self.chunks)

    def expert_load(self) -> dict:
        """Tokens routed to each expert of each MoE layer, summed over all ranks (a collective: every
        rank calls it together), with what each rank received and the imbalance (max / mean)."""
        counts = self.counts.clone()
        dist.all_reduce(counts)
        counts = counts.cpu()
        layers = []
        for layer, row in enumerate(counts.tolist()):
            per_rank = [sum(row[e] for e in experts) for experts in self.placement]
            mean_rank, mean_expert = sum(per_rank) / len(per_rank), sum(row) / len(row)
            layers.append({"layer": layer, "tokens_per_expert": row, "tokens_per_rank": per_rank,
                           "rank_imbalance": max(per_rank) / mean_rank if mean_rank else None,
                           "expert_imbalance": max(row) / mean_expert if mean_expert else None})
        return {"layers": layers, "placement": self.placement,
                "how": "(token, choice) assignments since load, all ranks; imbalance = max / mean"}

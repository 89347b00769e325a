"""Stage 3: passes over the exported graph, each a function program → program."""

from moec.compiler.passes.moe_lowering import lower_moe
from moec.compiler.passes.moe_region import MOE_BLOCKS, find_moe_regions

__all__ = ["MOE_BLOCKS", "find_moe_regions", "lower_moe"]

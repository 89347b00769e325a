"""`moe-compile recipe.yaml`: build a versioned artifact from a recipe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moec.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-compile", description="Compile a MoE model into a moec artifact.")
    parser.add_argument("recipe", help="recipe YAML (see recipes/tiny-mixtral.yaml)")
    parser.add_argument("--output", "-o", help="artifact directory (default: recipe output_dir or artifacts/<name>)")
    parser.add_argument("--explain", action="store_true", help="list the MoE regions found and stop before lowering")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    def body() -> int:
        from moec.compiler.pipeline import compile_recipe
        from moec.compiler.recipe import load_recipe

        recipe = load_recipe(args.recipe)
        out = Path(args.output) if args.output else recipe.resolved_output_dir(Path.cwd())
        compile_recipe(recipe, out, explain=args.explain)
        return 0

    return run_cli(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())

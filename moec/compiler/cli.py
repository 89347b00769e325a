"""`moe-compile recipe.yaml`: build a versioned artifact from a recipe."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moec.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-compile", description="Compile a MoE model into a moec artifact.")
    parser.add_argument("recipe", nargs="?", help="recipe YAML (see recipes/tiny-mixtral.yaml)")
    parser.add_argument("--output", "-o", help="artifact directory (default: recipe output_dir or artifacts/<name>); "
                                               "with --profile-hardware, the profile's JSON file")
    parser.add_argument("--explain", action="store_true",
                        help="list the MoE regions found (and the offload plan) and stop before lowering")
    parser.add_argument("--profile-hardware", action="store_true",
                        help="measure this machine's figures for offload planning (host link, GPU, CPU) and print "
                             "them as JSON, or write them to --output; a recipe names the file in offload.hardware")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if not args.profile_hardware and not args.recipe:
        parser.error("give a recipe YAML (or --profile-hardware)")

    def body() -> int:
        if args.profile_hardware:
            return _profile_hardware(args.output)
        from moec.compiler.recipe import load_recipe

        recipe = load_recipe(args.recipe)  # a bad recipe fails before torch and transformers load
        from moec.compiler.pipeline import compile_recipe

        out = Path(args.output) if args.output else recipe.resolved_output_dir(Path.cwd())
        compile_recipe(recipe, out, explain=args.explain)
        return 0

    return run_cli(body, args.debug)


def _profile_hardware(output: str | None) -> int:
    import json

    from rich.console import Console

    from moec.compiler.hardware_profile import measure_profile

    console = Console(stderr=True)
    with console.status("measuring host link, GPU and CPU ..."):
        profile = measure_profile()
    text = json.dumps(profile.as_dict(), indent=1)
    if output:
        Path(output).write_text(text + "\n")
        console.print(f"wrote {output} ({profile.source})")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

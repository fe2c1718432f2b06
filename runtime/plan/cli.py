"""`blockcache-plan`: check a plan folder, or seal a version-1 plan (no torch needed).

    blockcache-plan verify plans/l2c20      # the seal, every file's checksum, every graph against the manifest
    blockcache-plan upgrade plans/old       # a version-1 plan checked the same way, then sealed (version 2)
"""

from __future__ import annotations

from schedules.errors import cli_main
from schedules.options import ArgumentParser

from .files import load_plan
from .staging import upgrade_plan


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="blockcache-plan", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    sub.add_parser("verify", help="check a plan as the runtime loads it, in full").add_argument("plan")
    sub.add_parser("upgrade", help="seal a version-1 plan after checking everything else").add_argument("plan")
    return p


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "upgrade":
        manifest = upgrade_plan(args.plan)
        print(f"sealed {args.plan}: version {manifest['version']}, {len(manifest['files'])} files checked")
        return 0
    plan = load_plan(args.plan)
    programs = ", ".join(f"batch {p.batch_size} × {p.evaluations} steps ({len(p.variants)} variants)"
                         for p in plan.programs)
    print(f"{args.plan}: sealed version {plan.document['version']} plan of {plan.model_name or 'a model'} "
          f"({plan.family}, {plan.precision}): {programs}; every file and graph checked")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

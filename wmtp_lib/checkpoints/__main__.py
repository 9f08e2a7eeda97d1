"""The checkpoints command line:

    python -m wmtp_lib.checkpoints convert SRC DST     # Meta or Hugging Face checkpoint -> safetensors + manifest
    python -m wmtp_lib.checkpoints verify DIR          # every file of DIR against its manifest.json
    python -m wmtp_lib.checkpoints pull-run S3_URI DIR # one earlier run back from S3, newest checkpoint only
"""

from __future__ import annotations

import argparse
import sys

from wmtp_lib.checkpoints.manifest import ManifestError, verify_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wmtp_lib.checkpoints", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="Meta or Hugging Face checkpoint → safetensors directory + manifest")
    conv.add_argument("src")
    conv.add_argument("dst")
    ver = sub.add_parser("verify", help="check every file of a directory against its manifest.json")
    ver.add_argument("path")
    pull = sub.add_parser("pull-run", help="bring one earlier run back from S3 with only its newest checkpoint")
    pull.add_argument("uri", help="s3://bucket/runs/<run>/")
    pull.add_argument("dest", help="local run directory, e.g. runs/<run>")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            # torch and the model code only where a checkpoint is converted: `pull-run` is a VESSL job's first step
            from wmtp_lib.checkpoints.convert import convert_checkpoint

            out = convert_checkpoint(args.src, args.dst)
            print(f"converted {args.src} -> {out}")
        elif args.command == "verify":
            manifest = verify_manifest(args.path)
            print(f"{args.path}: {len(manifest['files'])} files match manifest.json")
        else:
            from wmtp_lib.checkpoints.storage import pull_run

            pull_run(args.uri, args.dest)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

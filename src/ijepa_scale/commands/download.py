"""`ijepa-scale download NAME|URL [--cache-dir DIR] [--sha256 HEX|FILE] [--quiet]`, `ijepa-scale download --list`."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError, one_line
from ..weights.download import CACHE_ENV_VAR, fetch, read_meta
from ..weights.registry import find_release, is_url, registry_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="ijepa-scale download",
        description="Download a released checkpoint (or any URL) into the verified cache and print its path.")
    parser.add_argument("source", nargs="?", help="registry name (see --list) or URL")
    parser.add_argument("--list", action="store_true", help="print the registry of released checkpoints")
    parser.add_argument("--cache-dir", default=None,
                        help=f"cache folder (default ${CACHE_ENV_VAR}, else ~/.cache/ijepa_scale)")
    parser.add_argument("--sha256", default=None, help="expected sha256: hex digest or a 'HEX  NAME' file")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    if args.list:
        print(registry_table())
        return 0
    if not args.source:
        parser.error("give a registry name or URL (or --list)")
    if not is_url(args.source) and find_release(args.source) is None:
        print(f"error: {args.source!r} is neither a URL nor a registry name; `ijepa-scale download --list` shows "
              f"the names", file=sys.stderr)
        return 2
    try:
        path = fetch(args.source, cache_dir=args.cache_dir, sha256=args.sha256, quiet=args.quiet)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    meta = read_meta(path.with_name(path.name + ".json"))
    print(path)
    if meta.get("sha256"):
        print(f"sha256 {meta['sha256']}  size {meta.get('size')} bytes", file=sys.stderr)
    return 0

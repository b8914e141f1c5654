"""The study's material: GSM8K splits, invented facts, and Botchan prose that no method trains on."""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from megatron_hdpissa.data.gsm8k import GSM8K_HELDOUT, split_gsm8k

# ---- GSM8K ---------------------------------------------------------------------------------------
def gsm8k_splits(path: str, num_test: int, num_val: int, split_seed: int = 0) -> dict[str, list[dict]]:
    """Train (1000 problems), test (the first `num_test` held-out problems) and validation (the
    next `num_val`): the learning rate is chosen on validation, results are reported on test, and
    neither shares a question with train."""
    train, heldout = split_gsm8k(path, num_heldout=GSM8K_HELDOUT, seed=split_seed)
    if num_test + num_val > len(heldout):
        raise ValueError(f"--num-test {num_test} + --num-val {num_val} exceed the {len(heldout)} "
                         "held-out problems")
    test, val = heldout[:num_test], heldout[num_test:num_test + num_val]
    seen = {r["question"] for r in train}
    leaked = [r["question"][:60] for r in test + val if r["question"] in seen]
    if leaked:
        raise AssertionError(f"held-out problems found in the training split: {leaked[:3]}")
    return {"train": train, "val": val, "test": test}


# ---- invented facts ------------------------------------------------------------------------------
_ONSETS = ("b", "br", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "kr", "l", "m", "n", "p", "pl",
           "qu", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "y")
_CODAS = ("", "", "n", "r", "l", "s", "m", "k", "x", "nd", "rt")
FACT_PROMPT = "The locker number of {name} is"


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(syllables)).capitalize()


def make_facts(count: int, seed: int) -> list[dict]:
    """`count` invented "name -> 3-digit number" facts, the same for the same seed: names are
    random syllables (distinct full names), numbers uniform in 100..999. Records carry the SFT
    fields {"question", "answer"} for the trainer (`--prompt-template "{prompt}"`)."""
    rng = random.Random(seed)
    facts, names = [], set()
    while len(facts) < count:
        name = f"{_word(rng, rng.choice((1, 2)))} {_word(rng, rng.choice((2, 3)))}"
        if name in names:
            continue
        names.add(name)
        number = rng.randint(100, 999)
        facts.append({"question": FACT_PROMPT.format(name=name), "answer": f" {number}",
                      "name": name, "number": number})
    return facts


# ---- text no method trains on --------------------------------------------------------------------
BOTCHAN_SDIST = "sentencepiece==0.2.1"
BOTCHAN_MEMBER = "sentencepiece-0.2.1/test/botchan.txt"
BOTCHAN_SHA256 = "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"


def botchan_path(cache: Path) -> Path:
    """`cache/botchan.txt`, Project Gutenberg's English "Botchan" (279 KB) from the sentencepiece
    0.2.1 source distribution, downloaded once with pip and checked against its SHA-256."""
    target = Path(cache) / "botchan.txt"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        BOTCHAN_SDIST, "-d", tmp], check=True)
        tarball = next(Path(tmp).glob("sentencepiece-*.tar.gz"))
        with tarfile.open(tarball) as tf:
            data = tf.extractfile(tf.getmember(BOTCHAN_MEMBER)).read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != BOTCHAN_SHA256:
            raise ValueError(f"{BOTCHAN_MEMBER} from {BOTCHAN_SDIST} has SHA-256 {digest}, expected {BOTCHAN_SHA256}")
        part = Path(tmp) / "botchan.txt"
        part.write_bytes(data)
        os.replace(part, target)
    return target


def gutenberg_body(text: str) -> str:
    """The book between Project Gutenberg's START and END markers (licence text removed)."""
    start, end = text.find("*** START OF"), text.find("*** END OF")
    if start < 0 or end < start:
        raise ValueError("no Project Gutenberg START / END markers in the text")
    return text[text.index("\n", start) + 1:end].strip()


def text_chunks(ids: list[int], length: int, count: int) -> list[list[int]]:
    """`count` non-overlapping windows of `length` token ids spread evenly over `ids`."""
    whole = len(ids) // length
    if count > whole:
        raise ValueError(f"the text holds {whole} windows of {length} tokens, fewer than {count}")
    stride = whole // count
    return [ids[i * stride * length:(i * stride + 1) * length] for i in range(count)]

"""Reference CLIP BPE tokenizer in plain Python (test fixtures and cross-checks of the C++ tokenizer).

Byte-level BPE: text is cleaned (HTML entities, whitespace) and lowercased, split by the CLIP pattern
  's|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+
each piece's UTF-8 bytes are mapped to printable characters, merged by rank, and looked up in the vocabulary
(256 bytes, the same with </w>, the merges, then <start_of_text> and <end_of_text>).
"""
import html
import re
import unicodedata

CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def is_letter(ch):
    return unicodedata.category(ch).startswith("L")


def is_number(ch):
    return unicodedata.category(ch).startswith("N")


def pre_tokenize(text):
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        if ch == "'":
            c = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
            if c:
                out.append(c)
                i += len(c)
                continue
        j = i + 1
        if is_letter(ch):
            while j < len(text) and is_letter(text[j]):
                j += 1
        elif not is_number(ch):
            while j < len(text) and not (text[j].isspace() or is_letter(text[j]) or is_number(text[j])):
                j += 1
        out.append(text[i:j])
        i = j
    return out


class Tokenizer:
    def __init__(self, merges_text, max_merges=48894):
        lines = merges_text.split("\n")[1:]
        merges = [tuple(line.split()) for line in lines if line.strip()][:max_merges]
        b2u = bytes_to_unicode()
        self.byte_encoder = b2u
        vocab = list(b2u.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = self.encoder["<start_of_text>"], self.encoder["<end_of_text>"]

    def bpe(self, token):
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text):
        text = re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip().lower()
        ids = []
        for piece in pre_tokenize(text):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(mapped)]
        return ids

    def tokenize(self, texts, context=77):
        import torch

        out = torch.zeros(len(texts), context, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot] + self.encode(text) + [self.eot]
            if len(ids) > context:
                ids = ids[:context]
                ids[-1] = self.eot
            out[row, : len(ids)] = torch.tensor(ids)
        return out

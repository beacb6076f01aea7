"""Learning a CLIP BPE tokenizer from captions: transformers' CLIPTokenizer (the independent implementation of
byte-pair encoding) reads the files and splits the corpus's words exactly as the merges intend."""
import json

from transformers import CLIPTokenizer

from sdjax.tokenizer import BOS_TOKEN, EOS_TOKEN, learn_bpe, write_clip_tokenizer

CORPUS = ["a small red circle on the left", "a large blue square at the top, red background",
          "A tiny red triangle in the middle!"] * 3


def test_frequent_words_become_single_tokens(tmp_path):
    tokenizer = write_clip_tokenizer(tmp_path, learn_bpe(CORPUS), model_max_length=16)
    for word in ("small", "circle", "square", "triangle", "background", "middle"):
        assert tokenizer.tokenize(word) == [f"{word}</w>"]
    assert tokenizer("red, red")["input_ids"][1:-1] == [tokenizer.convert_tokens_to_ids("red</w>"),
                                                         tokenizer.convert_tokens_to_ids(",</w>")] + \
        [tokenizer.convert_tokens_to_ids("red</w>")]


def test_the_files_alone_load_as_a_clip_tokenizer(tmp_path):
    merges = learn_bpe(CORPUS)
    written = write_clip_tokenizer(tmp_path / "full", merges, model_max_length=16)
    only = tmp_path / "only"
    only.mkdir()
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        (only / name).write_bytes((tmp_path / "full" / name).read_bytes())
    loaded = CLIPTokenizer.from_pretrained(only)
    for text in CORPUS + ["an astronaut riding a horse", "blue circle"]:
        assert loaded(text)["input_ids"] == written(text)["input_ids"]
    vocab = json.loads((only / "vocab.json").read_text())
    assert vocab[EOS_TOKEN] == len(vocab) - 1 and vocab[BOS_TOKEN] == len(vocab) - 2  # CLIP's argmax pooling
    assert loaded.model_max_length == 16


def test_learning_is_deterministic_and_stops_at_rare_pairs():
    assert learn_bpe(CORPUS) == learn_bpe(list(CORPUS))
    assert learn_bpe(["quick brown"], min_count=2) == []
    assert len(learn_bpe(CORPUS, max_merges=5)) == 5


def test_without_torch_transformers_gives_no_advice_about_it():
    """sdjax uses transformers for tokenizers only; a machine without torch is its normal setting, so transformers'
    "PyTorch was not found. Models won't be available" line would only puzzle a user."""
    import os
    import subprocess
    import sys
    block_torch = "import sys; sys.modules['torch'] = None; "
    # A fresh environment: sdjax's CLI, run in this process by other tests, silences transformers' advice there.
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    bare = subprocess.run([sys.executable, "-c", block_torch + "import transformers"], capture_output=True, text=True,
                          env=env)
    assert "PyTorch was not found" in bare.stderr  # what the import alone prints
    ours = subprocess.run([sys.executable, "-c", block_torch + "from sdjax.tokenizer import clip_tokenizer_class; "
                           "clip_tokenizer_class()"], capture_output=True, text=True, env=env)
    assert ours.returncode == 0 and "PyTorch" not in ours.stderr, ours.stderr

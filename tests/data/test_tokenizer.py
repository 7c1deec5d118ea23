import tiktoken

from jaxlin.data.tokenizer import EOT_TOKEN, get_tokenizer

TEXTS = [
    "Hello world, this is GPT-2.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Unicode: naïve café, 東京, emoji 🙂, math √(x^2)",
    "it's we'll they've I'M 12345 3.14159",
    "<|endoftext|> is ordinary text to encode_ordinary",
]


def test_known_ids(data_dir):
    enc = get_tokenizer(data_dir)
    assert enc.encode_ordinary(TEXTS[0]) == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_TOKEN]


def test_matches_tiktoken_gpt2(data_dir, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(data_dir / "gpt2_tokenizer" / "tiktoken_cache"))
    reference = tiktoken.get_encoding("gpt2")
    ours = get_tokenizer(data_dir)
    for text in TEXTS:
        assert ours.encode_ordinary(text) == reference.encode_ordinary(text)
        assert ours.decode(ours.encode_ordinary(text)) == text

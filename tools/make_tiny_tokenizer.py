"""Rebuild src/peftlab/data/bundled/dolly-bpe4k-tokenizer.json.gz: a 4,096-token byte-level BPE trained on the
bundled Dolly text, the vocabulary of the tiny CPU twins (a 50k vocabulary would make their logits dominate CPU time).
Run from the repo root: python tools/make_tiny_tokenizer.py
"""
import gzip
import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

with gzip.open("src/peftlab/data/bundled/databricks-dolly-15k.jsonl.gz", "rt") as lines:
    rows = [json.loads(line) for line in lines]
texts = [r["instruction"] + "\n" + r["context"] + "\n" + r["response"] for r in rows]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.post_processor = processors.ByteLevel(trim_offsets=False)
tr = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
tok.train_from_iterator(texts, tr)
print(tok.get_vocab_size(), tok.token_to_id("<|endoftext|>"), tok.encode("Hello world, what is the capital of France?").tokens)
with gzip.GzipFile("src/peftlab/data/bundled/dolly-bpe4k-tokenizer.json.gz", "wb", mtime=0, compresslevel=9) as f:
    f.write(tok.to_str().encode())

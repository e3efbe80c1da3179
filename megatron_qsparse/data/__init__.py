"""Data: tokenizer, preprocessing to .bin/.idx, the default corpus, and the datasets training reads."""

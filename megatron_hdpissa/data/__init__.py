"""SFT data, tokenizers and the packaged real material."""

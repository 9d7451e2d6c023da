"""gptpipe: a reproducible DVC pipeline from raw text to a pretrained and RLHF-tuned GPT."""

"""Model adapters and their inputs: frames to vision patches, the Qwen tokenizer, video sampling."""

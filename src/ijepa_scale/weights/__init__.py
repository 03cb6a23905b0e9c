"""Released weights: registry and download, official and Hugging Face formats, load_*, export."""

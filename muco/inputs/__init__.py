"""Model inputs: the chat templates, the image policy and sequence encoding (shared by data, encoder and eval)."""

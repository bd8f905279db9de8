"""The conversation data pipeline: records -> chat template -> assistant-only labels -> packing -> loader."""

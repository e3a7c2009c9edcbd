"""Fixtures shared by test files."""

import pytest
import torch


@pytest.fixture
def make_bert():
    """Builds a two-layer ``transformers.BertModel`` (hidden 32, 2 heads, vocabulary 50) from a
    config under ``torch.manual_seed(0)``, a fresh one per call: no weights are downloaded.
    Skips the test without transformers."""
    transformers = pytest.importorskip("transformers")

    def build():
        torch.manual_seed(0)
        return transformers.BertModel(transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=50, max_position_embeddings=32))

    return build

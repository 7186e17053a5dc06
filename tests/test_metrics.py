"""Training FLOPs and MFU: counted per stack on non-pad tokens."""

import torch
from transformers import BartConfig

from kilm_ray.train.metrics import BartDims, LossSums, bart_train_flops, mfu


def _dims(d, layers, ffn):
    return BartDims.of(BartConfig(vocab_size=50265, d_model=d, encoder_layers=layers, decoder_layers=layers,
                                  encoder_ffn_dim=ffn, decoder_ffn_dim=ffn))


def test_flops_per_sequence_match_the_design_figures():
    # shared/DESIGN.md section 4: 239 GFLOP (bart-base) and 767 (bart-large) per 512/128 sequence.
    assert round(bart_train_flops(_dims(768, 6, 3072), [512], [128]) / 1e9) == 239
    assert round(bart_train_flops(_dims(1024, 12, 4096), [512], [128]) / 1e9) == 767


def test_padding_is_not_counted_and_mfu_uses_counted_flops():
    dims = _dims(64, 2, 128)
    batch = {"input_ids": torch.ones(2, 16, dtype=torch.long),
             "attention_mask": torch.tensor([[1] * 16, [1] * 4 + [0] * 12]),
             "labels": torch.tensor([[5] * 8 + [-100] * 8, [5] * 3 + [-100] * 13]),
             "label_weights": torch.ones(2, 16), "knowledge_mask": torch.zeros(2, 16, dtype=torch.bool)}
    sums = LossSums()
    sums.add_batch(torch.zeros(2, 16), batch, dims)
    assert sums.model_flops == bart_train_flops(dims, [16, 4], [8, 3])
    assert sums.model_flops < bart_train_flops(dims, [16, 16], [16, 16]) / 2
    assert LossSums.from_vector(sums.vector()).model_flops == sums.model_flops
    assert mfu(2e12, 2, 1.0) == 1.0 and mfu(1.0, 1, 0.0) == 0.0

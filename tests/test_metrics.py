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
    totals = LossSums.totals(sums.vector().tolist())
    assert totals.model_flops == bart_train_flops(dims, [16, 4], [8, 3])
    assert totals.model_flops < bart_train_flops(dims, [16, 16], [16, 16]) / 2
    assert totals.tokens == 64 and totals.nonpad_tokens == 20 + 11 and totals.sequences == 2
    assert mfu(2e12, 2, 1.0) == 1.0 and mfu(1.0, 1, 0.0) == 0.0


def test_loss_sums_match_the_per_token_definition_and_read_nothing_back():
    """The sums a micro-batch adds are tensor ops only: no host read (`item`, `float`, `tolist`, boolean
    indexing) until the log step reads the vector once."""
    from kilm_ray.train.metrics import host_reads

    torch.manual_seed(0)
    ce = torch.rand(2, 6)
    labels = torch.tensor([[4, 5, 6, -100, -100, -100], [7, 8, -100, -100, -100, -100]])
    know = torch.tensor([[0, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    weights = (labels != -100).float() * (1 + know.float())
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "labels": labels, "label_weights": weights, "knowledge_mask": know}
    sums = LossSums()
    with host_reads() as reads:
        for _ in range(3):
            sums.add_batch(ce, batch, _dims(64, 2, 128))
        ce[know].sum().item()  # what the counter counts: a mask index and a read
    assert reads.names == ["__getitem__", "item"]
    summary = LossSums.totals(sums.vector().tolist()).summary()
    valid = labels != -100
    assert abs(summary["loss"] - float((ce * weights).sum() / weights.sum())) < 1e-6
    assert abs(summary["knowledge_loss"] - float(ce[know].mean())) < 1e-6
    assert abs(summary["copy_loss"] - float(ce[valid & ~know].mean())) < 1e-6


def test_4d_attention_masks_give_the_same_logits_and_no_host_read():
    """`validation.attention_masks`: BART given the 4-D masks it would build from the padding mask
    computes the same logits (SDPA and eager attention), and its forward reads nothing back to the host
    (given 2-D masks, transformers checks `mask.all()` on the host, once per mask and forward)."""
    from transformers import BartForConditionalGeneration

    from kilm_ray.train.metrics import host_reads
    from kilm_ray.train.validation import attention_masks

    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])
    batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(3, 100, (2, 6))}
    for impl in ("sdpa", "eager"):
        config = BartConfig(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64,
                            decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
                            max_position_embeddings=64, attn_implementation=impl)
        model = BartForConditionalGeneration(config).eval()
        with torch.no_grad():
            plain = model(input_ids=ids, attention_mask=mask, decoder_input_ids=batch["decoder_input_ids"],
                          use_cache=False).logits
            encoder_mask, causal = attention_masks(batch, model.config._attn_implementation, torch.float32)
            with host_reads() as reads:
                ours = model(input_ids=ids, attention_mask=encoder_mask, decoder_input_ids=batch["decoder_input_ids"],
                             decoder_attention_mask=causal, use_cache=False).logits
        assert torch.equal(plain, ours), impl
        assert reads.count == 0, (impl, reads.names)


def test_fp16_encoder_layers_clamp_on_the_device_without_a_host_read():
    """transformers' BART encoder layer decides its fp16 overflow clamp on the host (a sync per layer per
    micro-batch); kilm_ray's models make the same choice on the device: the same values, finite or not."""
    from transformers import BartForConditionalGeneration

    from kilm_ray.model.bart import without_host_syncs
    from kilm_ray.train.metrics import host_reads

    torch.manual_seed(0)
    config = BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=1, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
                        max_position_embeddings=64)
    theirs = BartForConditionalGeneration(config).eval().half()
    ours = BartForConditionalGeneration(config).eval().half()
    ours.load_state_dict(theirs.state_dict())
    assert without_host_syncs(ours) == 2
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    for gain in (1.0, 6e4):  # finite, then past fp16's range (inf: the clamp applies)
        for model in (theirs, ours):
            model.model.encoder.layers[0].final_layer_norm.weight.data.fill_(gain)
        hidden = torch.randn(2, 5, 32, dtype=torch.float16)
        with torch.no_grad():
            with host_reads() as their_reads:
                expected = theirs.model.encoder.layers[0](hidden, attention_mask=mask)
            with host_reads() as our_reads:
                got = ours.model.encoder.layers[0](hidden, attention_mask=mask)
        expected, got = (x[0] if isinstance(x, tuple) else x for x in (expected, got))
        assert torch.equal(expected, got) and torch.isfinite(got).all(), gain
        assert their_reads.count >= 1 and our_reads.count == 0, (their_reads.names, our_reads.names)

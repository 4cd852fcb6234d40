"""Drop-in integration on a tiny LlavaForConditionalGeneration (SigLIP + Qwen2), against a hand-written
eager equivalent."""

import math

import pytest
import torch

from rgpt4d.integrations.transformers import (apply_rgpt4d, attach_p4d, detach_p4d, p4d_latent_loss,
                                              remove_rgpt4d)

IMG, PATCH, P, T, IMAGE_ID = 32, 8, 16, 3, 99


def tiny_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    torch.manual_seed(0)
    vc = SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            image_size=IMG, patch_size=PATCH, vision_use_head=False)
    tc = Qwen2Config(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)
    cfg = LlavaConfig(vision_config=vc.to_dict() | {"model_type": "siglip_vision_model"},
                      text_config=tc.to_dict() | {"model_type": "qwen2"}, image_token_index=IMAGE_ID,
                      vision_feature_select_strategy="full", vision_feature_layer=-1, image_seq_length=P)
    return LlavaForConditionalGeneration(cfg).eval()


def inputs(B=2):
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.full((B, 1), 5), torch.full((B, T * P), IMAGE_ID), torch.randint(1, 50, (B, 4), generator=g)], 1)
    pv = torch.randn(B * T, 3, IMG, IMG, generator=g)
    ts = torch.tensor([[0.0, 0.4, 1.3], [2.0, 7.5, 11.0]])[:B]
    return ids, pv, ts


def eager_reference(model, ids, pv, ts):
    """What the patched model must compute, written out by hand from the paper's formula."""
    vis = model.model.vision_tower(pixel_values=pv, output_hidden_states=True).hidden_states[-1]  # [N, P, D]
    D = vis.shape[-1]
    t = ts.reshape(-1, 1, 1).double()
    i = torch.arange(D) // 2
    angle = t / (10000.0 ** (2.0 * i / D))
    enc = torch.where(torch.arange(D) % 2 == 0, torch.sin(angle), torch.cos(angle)).float()  # [N, 1, D]
    feats = model.model.multi_modal_projector(vis + enc)
    emb = model.get_input_embeddings()(ids)
    emb = emb.masked_scatter((ids == IMAGE_ID)[..., None], feats.reshape(-1, feats.shape[-1]))
    h = model.model.language_model(inputs_embeds=emb).last_hidden_state
    return model.lm_head(h)


def test_tpe_matches_the_eager_equivalent_and_nothing_changes_without_timestamps():
    model = tiny_llava()
    ids, pv, ts = inputs()
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pv).logits
        apply_rgpt4d(model)
        same = model(input_ids=ids, pixel_values=pv).logits
        patched = model(input_ids=ids, pixel_values=pv, timestamps=ts).logits
        flat = model(input_ids=ids, pixel_values=pv, timestamps=ts.reshape(-1)).logits  # [num_images] also works
        ref = eager_reference(model, ids, pv, ts)
    assert torch.equal(before, same)
    assert not torch.allclose(before, patched, atol=1e-3)
    torch.testing.assert_close(patched, ref, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(flat, patched)
    remove_rgpt4d(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pv).logits, before)


def test_generate_with_timestamps():
    model = apply_rgpt4d(tiny_llava())
    ids, pv, ts = inputs()
    out = model.generate(input_ids=ids, pixel_values=pv, timestamps=ts, max_new_tokens=3, min_new_tokens=3,
                         do_sample=False)
    assert out.shape == (2, ids.shape[1] + 3)
    with torch.no_grad():
        first = model(input_ids=ids, pixel_values=pv, timestamps=ts).logits[:, -1].argmax(-1)
    assert torch.equal(out[:, ids.shape[1]], first)


def test_timestamp_count_must_match_images():
    model = apply_rgpt4d(tiny_llava())
    ids, pv, ts = inputs()
    with pytest.raises(ValueError, match="timestamps: one per image of pixel_values; got 5 timestamps for 6 images"):
        model(input_ids=ids, pixel_values=pv, timestamps=ts.reshape(-1)[:5])


def test_region_tokens_at_obj_positions():
    model = apply_rgpt4d(tiny_llava(), obj_token_ids=[60, 61])
    ids, pv, ts = inputs()
    ids[:, -2] = 60
    boxes = torch.tensor([[[1.0, 1.0, 20.0, 20.0]], [[4.0, 8.0, 30.0, 31.0]]])
    out = model(input_ids=ids, pixel_values=pv, timestamps=ts, boxes=boxes)
    out.logits.sum().backward()
    assert model.rgpt4d_region_encoder.encoder.proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        moved = model(input_ids=ids, pixel_values=pv, timestamps=ts, boxes=boxes.flip(0)).logits
    assert not torch.allclose(moved, out.logits.detach())
    ids[0, -1] = 61  # <obj_2> with one region
    with pytest.raises(ValueError, match="refers to <obj_2> but only 1 region"):
        model(input_ids=ids, pixel_values=pv, timestamps=ts, boxes=boxes)
    with pytest.raises(ValueError, match="boxes: must lie inside the 32x32 image"):
        model(input_ids=ids, pixel_values=pv, timestamps=ts, boxes=boxes + 20)


def test_p4d_heads_attach_and_detach():
    model = apply_rgpt4d(tiny_llava())
    names = sorted(n for n, _ in model.named_parameters())
    attach_p4d(model, teacher_dim=16, teacher_grid=(1, 4, 4), tubelet=2)
    ids, pv, ts = inputs()
    out = model(input_ids=ids, pixel_values=pv, timestamps=ts, output_hidden_states=True)
    loss = p4d_latent_loss(model, out.hidden_states[-1], ids, T, torch.randn(2, 1, 4, 4, 16))
    loss.backward()
    assert model.rgpt4d_p4d.fc1.weight.grad is not None
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    detach_p4d(model)
    assert sorted(n for n, _ in model.named_parameters()) == names


def test_the_example_runs(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "llava_dropin.py"
    spec = importlib.util.spec_from_file_location("llava_dropin", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main()
    out = capsys.readouterr().out
    assert "unchanged: True" in out and "removed before saving: True" in out
